"""Template thumbnails: workflows/<name>.jpg from the screenshot docs/screenshots/<name>.png.

ComfyUI's front end shows `<name>.jpg`, next to `<name>.json` in a pack's example workflows
folder, as the template's thumbnail. Refresh them after refreshing the screenshots (see
tests/test_workflows_frontend.py), with any Python that has Pillow (ComfyUI's has):

    python tests/make_thumbnails.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "screenshots"
WORKFLOWS = ROOT / "workflows"
WIDTH = 640  # the template cards are a few hundred pixels wide
QUALITY = 85


def make_thumbnail(screenshot: Path, thumbnail: Path) -> None:
    """Write `screenshot` scaled to WIDTH pixels wide as the JPEG `thumbnail`."""
    with Image.open(screenshot) as image:
        rgb = image.convert("RGB")
    height = round(rgb.height * WIDTH / rgb.width)
    rgb.resize((WIDTH, height), Image.Resampling.LANCZOS).save(
        thumbnail, "JPEG", quality=QUALITY, optimize=True
    )


def main() -> None:
    for workflow in sorted(WORKFLOWS.glob("*.json")):
        screenshot = SCREENSHOTS / f"{workflow.stem}.png"
        if not screenshot.is_file():
            raise SystemExit(f"no screenshot {screenshot} for {workflow.name}")
        make_thumbnail(screenshot, workflow.with_suffix(".jpg"))
        print(f"wrote {workflow.with_suffix('.jpg').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
