"""book/check_site.py finds each kind of problem it promises to find, on a small fake site."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("book_check_site", REPO / "book" / "check_site.py")
check_site = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = check_site
spec.loader.exec_module(check_site)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(check_site.CHROMIUM, os.X_OK),
                       reason=f"no browser at {check_site.CHROMIUM} (apt-get install chromium)"),
]

HEAD = '<html><head><script defer src="_static/mathjax/tex-chtml.js"></script></head><body>'
GOOD = HEAD + """
<p>Inline <span class="math notranslate">\\(\\frac{1}{2}\\)</span> and display:</p>
<div class="math notranslate">\\[ a = b \\tag{1.1} \\]</div>
<img src="_images/dot.png"><a href="#x"><span class="xref std std-ref">a link</span></a>
</body></html>"""
BAD = HEAD + """
<div class="math notranslate">\\[\\begin{split} a \\\\ b \\tag{4.3} \\end{split}\\]</div>
<p>p = \x0crac{n}{m} and a raw \\frac{1}{2} in the prose</p>
<img src="_images/missing.png">
<span class="xref std std-ref">no-such-label</span>
<div class="cell_output"><pre>Traceback (most recent call last):
ValueError: boom</pre></div>
<script src="https://cdn.example.org/x.js"></script>
</body></html>"""
DOT_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mathjax

    root = tmp_path_factory.mktemp("site")
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    shutil.copytree(es5, root / "_static" / "mathjax",
                    ignore=shutil.ignore_patterns("*-full*", "*svg*", "sre"))
    (root / "_images").mkdir()
    (root / "_images" / "dot.png").write_bytes(DOT_PNG)
    (root / "index.html").write_text(GOOD)
    (root / "bad.html").write_text(BAD)
    (root / "redirect.html").write_text('<meta http-equiv="Refresh" content="0; url=index.html" />')
    (root / "broken.html").write_text('<meta http-equiv="Refresh" content="0; url=nowhere.html" />')
    return root


def test_good_and_bad_pages(site: Path) -> None:
    report = check_site.check_site(site)
    good, bad = report["pages"]["index.html"], report["pages"]["bad.html"]
    assert good["problems"] == [], good["problems"]
    assert good["formulas"] == 2 and good["images"] == 1

    problems = "\n".join(bad["problems"])
    assert "MathJax error" in problems and "split" in problems
    assert "image missing: _images/missing.png" in problems
    assert "unresolved reference: no-such-label" in problems
    assert "error output" in problems
    assert "control character in the prose" in problems
    assert "TeX in the prose" in problems
    assert "request to another host (blocked): https://cdn.example.org/x.js" in problems
    assert report["pages"]["redirect.html"]["problems"] == []
    broken = report["pages"]["broken.html"]["problems"]
    assert broken == ["redirect to a missing page: nowhere.html"]
    assert report["summary"]["pages"] == 4
