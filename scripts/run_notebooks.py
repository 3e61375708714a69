"""Execute the notebooks in place (full sizes, outputs saved) and extract their figures into docs/figures/.

    .venv/bin/python scripts/run_notebooks.py [notebooks/statistics.ipynb ...]

With ``SOFTMIX_QUICK=1`` in the environment the notebooks run with the small sizes CI uses.
The extracted PNGs are the README's thumbnails.
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path) -> None:
    t0 = time.perf_counter()
    book = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(book, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    nbformat.write(book, path)
    print(f"{path.relative_to(ROOT)}: executed in {time.perf_counter() - t0:.0f} s")
    n = 0
    for cell in book.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            png = output.get("data", {}).get("image/png")
            if png:
                n += 1
                target = ROOT / "docs" / "figures" / f"{path.stem}_{n}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(png))
                print(f"  {target.relative_to(ROOT)}")


def main() -> None:
    paths = [Path(p).resolve() for p in sys.argv[1:]] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        run(path)


if __name__ == "__main__":
    main()
