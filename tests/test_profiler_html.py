"""The HTML report renders in a real browser (headless Chromium), offline.

Skipped when no Chromium is installed (Debian: ``apt-get install chromium``).
The page is self-contained, so the browser runs with networking features
off; the screenshot must be the page (the right size, many colours, the
hotspot red present), not a blank or an error page.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
import torch
import torch.nn as nn

import deepseek as ds
from deepseek.profiler import DevicePeaks

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
WIDTH, HEIGHT = 1240, 1400


class Demo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.special.erfc(h * 0.5)  # a fallback node, for the warning card
        return self.fc(h.mean(dim=(2, 3)))


def screenshot(browser: str, html_path: str, png_path: str, profile_dir: str,
               width: int = WIDTH, height: int = HEIGHT) -> None:
    """Render ``html_path`` with headless Chromium into ``png_path``."""
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={profile_dir}",
                    "--hide-scrollbars", f"--window-size={width},{height}",
                    f"--screenshot={png_path}", f"file://{html_path}"],
                   check=True, timeout=90, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(BROWSER is None, reason="headless Chromium is not installed")
def test_html_report_renders_in_headless_chromium(tmp_path):
    x = torch.randn(2, 3, 24, 24)
    engine = ds.compile(Demo().eval(), (x,), backend="cpu", disable_passes=["fuse_conv_bn"])
    with ds.profile(engine, peaks=DevicePeaks("cpu", 50.0, 10.0)) as prof:
        for _ in range(4):
            engine(x)
    report = prof.report()
    paths = report.save(str(tmp_path / "out"))
    png = tmp_path / "report.png"
    screenshot(BROWSER, paths["html"], str(png), str(tmp_path / "chromium-profile"))
    data = png.read_bytes()
    assert _png_size(data) == (WIDTH, HEIGHT)
    Image = pytest.importorskip("PIL.Image")
    image = Image.open(png).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50  # text, charts and tables, not a blank page
    counts = {c: n for n, c in colours}
    assert counts.get((0xd0, 0x45, 0x3a), 0) > 100  # the hotspot / warning red is drawn
    assert {s["kind"] for s in report.suggestions} >= {"cpu_fallback", "bn_not_folded"}
