"""report.html of a small sweep folder written by hand in the real formats (no Ray, no training): its
sections and anchors, a degenerate trial named and its skipped figures left out, the provenance read from
the trials' files, thumbnails whose labels read without a click. The report of a trained and interpreted
sweep, rendered in Chromium, is in test_postprocess.py."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vgg_xai import features, trial_folder
from vgg_xai.config import TrialConfig
from vgg_xai.postprocess import SCHEMA
from vgg_xai.report import PAGE_PX, SWEEP_THUMB_SCALE, THUMB_SCALE, build_html

GOOD, BAD, PENDING = "bn-lr1e-3-s0", "plain-lr1e-2-s0", "l2-lr1e-3-s0"
COMMIT = "0123456789abcdef0123"
REASON = "one predicted class (ship) for every test image"
# Sizes as viz draws them (at 100 dpi), and one wider than the page's column at any scale.
FIGURES = {"curves": (1000, 400), "confusion": (1640, 550), "cam": (515, 1048), "filters_last": (2400, 600)}
# The smallest text viz draws in a figure, 10 points at 100 dpi (14 px), reads on a screen from 9 px up.
READABLE = 9 / (10 / 72 * 100)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _png(path: Path, size: tuple[int, int]) -> None:
    """A figure-like PNG: white, a frame, a line and a label."""
    im = Image.new("RGBA", size, "white")
    d = ImageDraw.Draw(im)
    d.rectangle([40, 20, size[0] - 20, size[1] - 40], outline="black")
    d.line([(40, size[1] - 40), (size[0] - 20, 20)], fill="steelblue", width=3)
    d.text((50, size[1] - 30), "epoch", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _trial(sweep: Path, variant: str, schedule: str, acc: float | None) -> Path:
    """A trial folder through its owner's file names: its config, and where acc is given its history, attempt
    and result."""
    cfg = TrialConfig(variant=variant, lr_schedule=schedule, seed=0, width=0.125, epochs=2, data="/c.h5")
    d = sweep / "trials" / cfg.trial_id
    d.mkdir(parents=True)
    (d / trial_folder.CONFIG).write_text(cfg.to_json())
    if acc is None:
        return d
    header = ",".join(trial_folder.HISTORY_NUMBERS + ("status",))
    rows = [f"{e},0.001,1.0,0.5,1.1,{acc},2.0,900.0,ok" for e in (1, 2)]
    (d / trial_folder.HISTORY).write_text("\n".join([header] + rows) + "\n")
    (d / trial_folder.ATTEMPTS).write_text(json.dumps({"attempt": 1, "host": "node1", "pid": 1, "start_epoch": 0,
                                                      "time": time.time() - 60}) + "\n")
    (d / trial_folder.RESULT).write_text(json.dumps({
        "trial_id": cfg.trial_id, "status": "completed", "epochs_completed": 2, "best_valid_acc": acc, "best_epoch": 2,
        "test_loss": 1.0, "test_acc": acc, "wall_s": 4.0}))
    features.write(d / "features.h5", features.FeatureDump(
        features=np.zeros((4, 8)), logits=np.zeros((4, 10)), labels=np.arange(4), predictions=np.arange(4),
        history={}, config=cfg.to_dict(), classes=[str(i) for i in range(10)], versions={"torch": "9.9"},
        git_commit=COMMIT))
    return d


def _interpreted(d: Path, degenerate: bool) -> None:
    """What post-processing leaves: a PNG per figure and metrics.json (the degenerate trial's CAM skipped)."""
    for fig, size in FIGURES.items():
        _png(d / "interpret" / f"{fig}.png", size)
    (d / "interpret" / "metrics.json").write_text(json.dumps({
        "schema": SCHEMA, "trial_id": d.name, "device": "cpu", "summary": {"test_acc": 0.1, "ece": 0.02},
        "degenerate": {"detected": degenerate, "reasons": [REASON] if degenerate else []},
        "skipped": {"cam": "one predicted class: its maps explain nothing"} if degenerate else {}}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    s = tmp_path / "tiny"
    _interpreted(_trial(s, "bn", "const_1e-3", 0.6), degenerate=False)
    _interpreted(_trial(s, "plain", "const_1e-2", 0.1), degenerate=True)
    _trial(s, "l2", "const_1e-3", None)
    _png(s / "figures" / "accuracy.png", (600, 470))
    (s / "spec.yaml").write_text("name: tiny\ndata:\n  content_sha256: " + "ab" * 32 + "\n  split_seed: 0\n")
    return s


def _sections(page: str) -> dict[str, str]:
    """Each trial's section (its h3 up to the next heading), by trial id."""
    return dict(re.findall(r'<h3 id="t-([^"]+)">.*?</h3>(.*?)(?=<h[23]|</body>)', page, re.S))


def test_every_section_is_anchored_and_every_trial_is_there(sweep):
    page = build_html(sweep)
    ids = set(re.findall(r'id="([^"]+)"', page))
    nav = re.search(r"<nav>(.*?)</nav>", page).group(1)
    targets = re.findall(r'href="#([^"]+)"', nav)
    assert {"results", "compare", "provenance", "figures", "v-bn", "v-plain", "v-l2"} <= set(targets)
    assert set(targets) <= ids, set(targets) - ids
    assert set(_sections(page)) == {GOOD, BAD, PENDING}
    for tid in (GOOD, BAD, PENDING):  # the trials table links each trial to its section
        assert f'<a href="#t-{tid}">{tid}</a>' in page
    # The accuracy chart sits under the accuracy pivot, before the trials table.
    assert page.index('href="figures/accuracy.png"') < page.index("<h3>Trials</h3>")


def test_a_degenerate_trial_is_named_and_its_skipped_figures_left_out(sweep):
    page = build_html(sweep)
    assert f"3 trials, 2 interpreted, 1 degenerate ({BAD})" in page
    sections = _sections(page)
    banner = re.search(r'<div class="banner">(.*?)</div>', sections[BAD], re.S).group(1)
    assert "Degenerate trial." in banner and html.escape(REASON) in banner and "<b>cam</b>: one predicted" in banner
    shown = {tid: set(re.findall(r'interpret/(\w+)\.png"', s)) for tid, s in sections.items()}
    assert shown == {GOOD: set(FIGURES), BAD: set(FIGURES) - {"cam"}, PENDING: set()}
    assert 'class="banner"' not in sections[GOOD]
    assert "not interpreted (only completed trials are)" in sections[PENDING]
    assert re.search(rf'<tr class=degenerate><td><a href="#t-{BAD}">{BAD}</a></td>', page)


def test_a_collapsed_trial_is_degenerate_and_a_trial_outside_the_spec_is_left_out(sweep):
    """A trial stopped as collapsed (training.stop_dead) is marked degenerate with the epoch it stopped at;
    a folder the grown spec no longer lists is not in the report."""
    result = json.loads((sweep / "trials" / BAD / trial_folder.RESULT).read_text())
    why = "every one of 256 probe images gets the same feature vector: layer features.relu2 outputs zero"
    (sweep / "trials" / BAD / trial_folder.RESULT).write_text(json.dumps(
        {**result, "status": "collapsed", "epochs_completed": 1, "collapsed": why}))
    spec = (sweep / "spec.yaml").read_text()
    (sweep / "spec.yaml").write_text(spec + f"trials: [{GOOD}, {BAD}]\n")  # PENDING is outside the spec now
    page = html.unescape(build_html(sweep))
    assert set(_sections(page)) == {GOOD, BAD}
    assert PENDING not in page
    row = re.search(rf'<tr class=degenerate><td class="text"><a href="#t-{BAD}">{BAD}</a></td>(.*?)</tr>', page)
    assert row and '<td class="text">collapsed</td><td class="text">yes</td>' in row.group(1)
    assert f"collapsed: stopped after epoch 1, {why}" in page


def test_provenance_comes_from_the_trials_files(sweep):
    page = html.unescape(build_html(sweep))
    prov = dict(re.findall(r"<tr><td>([^<]+)</td><td>([^<]*)</td></tr>",
                           re.search(r'<h2 id="provenance">.*?</table>', page, re.S).group(0)))
    assert prov["code"] == f"git commit {COMMIT[:12]}"  # from features.h5's attributes
    assert prov["packages"] == "torch 9.9"
    assert prov["hosts"] == "node1" and prov["trials"] == "3: 2 completed, 1 pending"
    assert "content sha256 " + "ab" * 32 in prov["data"]
    assert f"git {COMMIT[:12]}" in _sections(page)[GOOD]


def _thumbnails(page: str) -> list[tuple[str, dict[str, str], Image.Image]]:
    """Each inline thumbnail: the PNG it links to, its <figure> and <img> attributes, the decoded image."""
    out = []
    for style, href, attrs in re.findall(r'<figure style="([^"]*)"><a href="([^"]+)"><img ([^>]*)>', page):
        a = dict(re.findall(r'(\w+)="([^"]*)"', attrs))
        a["figure_style"] = style
        out.append((href, a, Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))))
    return out


def test_thumbnails_are_scaled_so_their_labels_read(sweep):
    """Every figure's thumbnail is its PNG scaled by one factor at which its labels read (not one size for
    all, which shrinks a wide figure's text more), no wider than the page's column; the page says so in
    its width and height, and the caption wraps at the thumbnail's width."""
    assert THUMB_SCALE >= READABLE and SWEEP_THUMB_SCALE >= READABLE
    thumbs = _thumbnails(build_html(sweep))
    assert len(thumbs) == 1 + 2 * len(FIGURES) - 1  # the accuracy chart; the degenerate trial's cam is left out
    for href, a, im in thumbs:
        with Image.open(sweep / href) as full:
            native = full.size
        scale = SWEEP_THUMB_SCALE if href.startswith("figures/") else THUMB_SCALE
        want = min(round(native[0] * scale), PAGE_PX)
        assert im.width == want and abs(im.height - native[1] * want / native[0]) <= 1, (href, im.size, native)
        assert (a["width"], a["height"]) == (str(im.width), str(im.height)), href
        assert a["figure_style"] == f"width:{im.width + 2}px", href  # the image and its 1 px border
        assert im.width / native[0] >= READABLE or im.width == PAGE_PX, href
    assert any(im.width == PAGE_PX for _, _, im in thumbs)  # the wide one is capped


PROBE = ("<script>addEventListener('load',()=>{const b=document.body.dataset;"
         "b.sizes=JSON.stringify([...document.images].map(i=>[i.getAttribute('alt'),i.clientWidth,i.naturalWidth]));"
         "b.pagewidth=document.documentElement.scrollWidth;b.window=innerWidth});</script>")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium) to render the report")
def test_thumbnails_render_at_their_own_size_in_a_browser(sweep, tmp_path):
    """In a 1400 px window, Chromium draws every thumbnail at its own pixel size (no style shrinks its labels
    again) and the figures fit the page's width."""
    probe = sweep / "probe.html"
    probe.write_text(build_html(sweep).replace("</body>", PROBE + "</body>", 1))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--no-first-run", "--proxy-server=http://127.0.0.1:9",
                        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
                        "--window-size=1400,900", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=180)
    body = dict(re.findall(r'data-(\w+)="([^"]*)"', re.search(r"<body([^>]*)>", r.stdout).group(1)))
    sizes = json.loads(html.unescape(body["sizes"]))
    assert len(sizes) == len(_thumbnails(build_html(sweep))) and all(n > 0 for _, _, n in sizes), sizes
    assert all(shown == natural for _, shown, natural in sizes), [s for s in sizes if s[1] != s[2]]
    assert int(body["pagewidth"]) <= int(body["window"]), body
