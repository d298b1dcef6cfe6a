"""The tables of ``run.py``'s results: ``python render.py results-sgd.json results-adamw.json > tables.md``."""
import json
import sys

from weckd.chain.bench import ablation_table


def main() -> None:
    for path in sys.argv[1:]:
        for name, result in json.load(open(path)).items():
            print(f"<!-- {path}: {result['machine']}; overrides {', '.join(result['overrides'])} -->")
            print(ablation_table(result, name, "cwt"))


if __name__ == "__main__":
    main()
