"""Mean ± std per variant of an explore.py output, and the paired per-seed difference to a reference.

    python summ.py OUT.jsonl [REFERENCE]
"""
import collections
import json
import statistics as st
import sys


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1])]
    by: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for r in rows:
        by[r["variant"]][r["seed"]] = r
    ref = sys.argv[2] if len(sys.argv) > 2 else "cwt"
    for v, d in by.items():
        accs = [d[s]["test"] for s in sorted(d)]
        sd = st.stdev(accs) if len(accs) > 1 else 0
        line = f"{v:22s} n={len(accs)} {100 * st.fmean(accs):5.1f} ± {100 * sd:4.1f}"
        if ref in by and v != ref:
            diffs = [d[s]["test"] - by[ref][s]["test"] for s in d if s in by[ref]]
            if diffs:
                sd = st.stdev(diffs) if len(diffs) > 1 else 0
                line += f"  vs {ref} {100 * st.fmean(diffs):+5.1f} ± {100 * sd:4.1f}"
        print(line)


if __name__ == "__main__":
    main()
