#!/usr/bin/env python3
"""Open every page of the built site in headless Chromium and check what a reader would see.

The site is served from a loopback HTTP server and opened in Debian's Chromium
(``/usr/bin/chromium``, package ``chromium``; override with ``FTBOOK_CHROMIUM``), driven by
Playwright without Playwright's own browser download. Every request to another host is blocked
and reported: the site must work offline. Per page it reports:

- math: every Sphinx math element (``.math``) must hold a MathJax container, and no container
  may hold a MathJax error (``mjx-merror``: unknown macro, ``\\tag`` in ``split``, ...); TeX left
  in the prose outside math (``$$``, ``\\frac``, ``\\tag``, ...) counts as untypeset;
- images: every ``<img>`` must have loaded (``naturalWidth > 0``);
- error output: a traceback or error output of a cell;
- unresolved citations and cross-references: an ``.xref`` that is not a link, a ``??``;
- control characters in the prose (a ``\\f`` of ``\\frac`` or ``\\t`` of ``\\tag`` eaten by an
  edit) and JavaScript errors on the page.

Usage::

    python book/check_site.py _build/html [--report PATH]

Prints one line per page and a summary (pages, formulas typeset, images), writes a JSON report
(default ``<site>/../site-check.json``) and exits 1 when any page has a problem.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = os.environ.get("FTBOOK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SKIP_FOLDERS = ("_static", "_sources", "_images", "_downloads", "_panels_static")
MATHJAX_TIMEOUT_MS = 60_000

# Runs in the page once MathJax has finished; returns what the checks need.
INSPECT = r"""
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const text = (el) => (el.textContent || "").trim().slice(0, 120);
  const out = {formulas: 0, untypeset: [], math_errors: [], images: 0, missing_images: [],
               error_outputs: [], unresolved: [], raw_tex: [], control: []};
  for (const el of document.querySelectorAll(".math")) {
    if (el.querySelector("mjx-container")) out.formulas += 1;
    else out.untypeset.push(text(el));
  }
  for (const el of document.querySelectorAll("mjx-merror")) {
    out.math_errors.push(el.getAttribute("data-mjx-error") || text(el));
  }
  for (const img of document.querySelectorAll("img")) {
    if (img.complete && img.naturalWidth > 0) out.images += 1;
    else out.missing_images.push(img.getAttribute("src"));
  }
  for (const el of document.querySelectorAll(
      ".output.traceback, .output.error, .cell_output .traceback, div.output_error")) {
    out.error_outputs.push(text(el));
  }
  for (const el of document.querySelectorAll(".cell_output, .output")) {
    if ((el.textContent || "").includes("Traceback (most recent call last)")) {
      out.error_outputs.push(text(el));
    }
  }
  for (const el of document.querySelectorAll(".xref, .problematic")) {
    if (!el.closest("a")) out.unresolved.push(text(el));
  }
  const prose = "p, li, dt, dd, td, th, h1, h2, h3, h4, h5, h6, figcaption, .admonition";
  const tex = /\$\$|\\(frac|tag|begin|end|sum|mathbb|mathcal|operatorname|qquad)\b/;
  const control = /[\x00-\x09\x0b\x0c\x0e-\x1f]/;
  for (const el of document.querySelectorAll(prose)) {
    if (el.closest("pre, code, .math, mjx-container, .highlight, .cell_output, script, style"))
      continue;
    let own = "";
    for (const node of el.childNodes) {
      if (node.nodeType === Node.TEXT_NODE) own += node.textContent;
    }
    if (tex.test(own)) out.raw_tex.push(own.trim().slice(0, 120));
    if (control.test(own)) out.control.push(JSON.stringify(own.trim().slice(0, 120)));
    if (/\?\?/.test(own)) out.unresolved.push(own.trim().slice(0, 120));
  }
  return out;
}
"""


REFRESH = re.compile(r'<meta\s+http-equiv="refresh"\s+content="\d+;\s*url=([^"]+)"', re.I)


def pages(site: Path) -> list[Path]:
    """Every HTML page of the site, in a stable order."""
    return sorted(p for p in site.rglob("*.html")
                  if not any(part in SKIP_FOLDERS for part in p.relative_to(site).parts))


def redirect_target(page: Path) -> str | None:
    """The target of a redirect page (Jupyter Book's index.html), else None."""
    match = REFRESH.search(page.read_text(encoding="utf-8", errors="replace")[:2000])
    return match.group(1) if match else None


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def serve(site: Path) -> tuple[ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def problems_of(result: dict) -> list[str]:
    """The problems in one page's inspection result, one line each."""
    found = []
    for key, what in [("untypeset", "math not typeset"), ("math_errors", "MathJax error"),
                      ("missing_images", "image missing"), ("error_outputs", "error output"),
                      ("unresolved", "unresolved reference"), ("raw_tex", "TeX in the prose"),
                      ("control", "control character in the prose"),
                      ("external", "request to another host (blocked)"),
                      ("js_errors", "JavaScript error"), ("http_errors", "asset failed")]:
        found += [f"{what}: {item}" for item in result.get(key, [])]
    return found


def check_site(site: Path) -> dict:
    from playwright.sync_api import sync_playwright

    server, base = serve(site)
    report = {"site": str(site), "pages": {}}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for page_path in pages(site):
                rel = page_path.relative_to(site).as_posix()
                target = redirect_target(page_path)
                if target is not None:  # a redirect: its target must exist, and is checked
                    missing = not (page_path.parent / target.split("#")[0]).is_file()
                    report["pages"][rel] = {
                        "formulas": 0, "images": 0, "redirect": target,
                        "problems": [f"redirect to a missing page: {target}"] if missing else []}
                    continue
                page = browser.new_page()
                external, js_errors, http_errors = [], [], []

                def route(route, request, external=external) -> None:
                    host = urlsplit(request.url).hostname
                    if request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
                        route.continue_()
                    else:
                        external.append(request.url)
                        route.abort()

                page.route("**/*", route)
                page.on("pageerror", lambda error, js_errors=js_errors: js_errors.append(
                    str(error)[:200]))
                page.on("response", lambda response, http_errors=http_errors: http_errors.append(
                    f"{response.status} {response.url}") if response.status >= 400 else None)
                page.goto(f"{base}/{rel}", wait_until="load")
                page.set_default_timeout(MATHJAX_TIMEOUT_MS)
                result = page.evaluate(INSPECT)
                result.update(external=external, js_errors=js_errors, http_errors=http_errors)
                result["problems"] = problems_of(result)
                report["pages"][rel] = result
                page.close()
            browser.close()
    finally:
        server.shutdown()
    results = report["pages"].values()
    report["summary"] = {
        "pages": len(report["pages"]),
        "formulas_typeset": sum(r["formulas"] for r in results),
        "images": sum(r["images"] for r in results),
        "problems": sum(len(r["problems"]) for r in results),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site, e.g. _build/html")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args(argv)
    site = args.site.resolve()
    if not (site / "index.html").exists():
        print(f"check_site: no index.html in {site}; build the book first", file=sys.stderr)
        return 2
    report = check_site(site)
    for rel, result in report["pages"].items():
        status = "ok" if not result["problems"] else f"{len(result['problems'])} problem(s)"
        print(f"{rel:45s} formulas {result['formulas']:4d}  images {result['images']:3d}  {status}")
        for problem in result["problems"]:
            print(f"    - {problem}")
    summary = report["summary"]
    print(f"site check: {summary['pages']} pages, {summary['formulas_typeset']} formulas typeset, "
          f"{summary['images']} images, {summary['problems']} problems")
    path = args.report or site.parent / "site-check.json"
    path.write_text(json.dumps(report, indent=1))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
