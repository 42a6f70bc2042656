"""Kubernetes resource quantities ("500m", "64Gi", "1.5"), compared as the API server compares them.

Dependency-free: the operator image and the API validation read it. Only the forms the API's
`Quantity` pattern admits are parsed (no exponent notation)."""

from __future__ import annotations

from decimal import Decimal

_SUFFIX = {
    "": Decimal(1), "m": Decimal("0.001"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}  # fmt: skip


def quantity(text: str) -> Decimal:
    """The value of a quantity; ValueError for a form it does not know."""
    number = text.rstrip("kmMGTPEi")
    suffix = text[len(number) :]
    if suffix not in _SUFFIX or not number:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    return Decimal(number) * _SUFFIX[suffix]
