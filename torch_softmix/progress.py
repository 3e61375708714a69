"""Progress bars for the phases of a fit (screening, EM, L-BFGS), one at a time, or none."""

from __future__ import annotations


class Bars:
    """Opens one tqdm bar per phase, closing the previous one; does nothing when disabled."""

    def __init__(self, enabled: bool, label: str = "") -> None:
        self.enabled, self.label, self.bar = bool(enabled), label, None

    def open(self, desc: str, total: int, unit: str = "it"):
        """A new bar for a phase of ``total`` steps (``None`` when disabled)."""
        self.close()
        if not self.enabled:
            return None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"{desc} {self.label}".strip(), unit=unit)
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
