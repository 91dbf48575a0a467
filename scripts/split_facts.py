"""Assign each record of engram_helpers/facts.json to the development ("dev") or test ("test") split.

Hyperparameters and layers are chosen on the dev facts and results are reported on the disjoint test facts.
The split is stratified by relation: within every relation, the number of dev records is
round(DEV_FRACTION * n) for its n records (halves round up).

Stable and deterministic: a record that already has a split keeps it. Records without one are taken, relation
by relation, in the order of a seeded hash of (relation, subject, id) and each goes to "dev" while its relation
has fewer dev records than round(DEV_FRACTION * count so far), else to "test". Run on an empty split this gives
the stratified split above; run after appending records it places only the new ones and keeps the quota.

Usage (from the repository root):  python scripts/split_facts.py          # writes facts.json in place
                                   python scripts/split_facts.py --check  # exits 1 if a record lacks a split
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

SEED = 20261129
DEV_FRACTION = 0.4
SPLITS = ("dev", "test")
FACTS_PATH = Path(__file__).resolve().parents[1] / "engram_helpers" / "facts.json"


def dev_quota(n: int) -> int:
    """Number of dev records a relation with ``n`` records should have: round(DEV_FRACTION * n), halves up."""
    return math.floor(DEV_FRACTION * n + 0.5)


def _order_key(record: dict) -> str:
    text = f"{SEED}|{record['relation']}|{record['subject']}|{record['id']}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assign_splits(records: list[dict]) -> list[dict]:
    """Copies of ``records`` where every record has ``"split"`` in ("dev", "test"); existing splits are kept."""
    out = [dict(r) for r in records]
    for r in out:
        if "split" in r and r["split"] not in SPLITS:
            raise ValueError(f"record {r.get('id')} has split {r['split']!r}; use one of {SPLITS} or delete the field")
    by_relation: dict[str, list[dict]] = {}
    for r in out:
        by_relation.setdefault(r["relation"], []).append(r)
    for group in by_relation.values():
        n_dev = sum(r.get("split") == "dev" for r in group)
        n = sum("split" in r for r in group)
        for r in sorted((r for r in group if "split" not in r), key=_order_key):
            n += 1
            if n_dev < dev_quota(n):
                r["split"] = "dev"
                n_dev += 1
            else:
                r["split"] = "test"
    return out


def dumps(records: list[dict]) -> str:
    """The file's layout: a JSON list with one record per line."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    return "[\n" + ",\n".join("  " + line for line in lines) + "\n]\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that every record has a split")
    parser.add_argument("--path", type=Path, default=FACTS_PATH)
    args = parser.parse_args(argv)
    records = json.loads(args.path.read_text(encoding="utf-8"))
    missing = [r["id"] for r in records if "split" not in r]
    if args.check:
        if missing:
            print(f"records without a split: {missing}; run python scripts/split_facts.py", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(dumps(assign_splits(records)), encoding="utf-8")
    print(f"assigned {len(missing)} new record(s); {len(records)} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
