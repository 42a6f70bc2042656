"""Print the requirements of pyproject.toml's core and the named extras, one per line.

The images install these in a layer of their own, before the source is copied: a change to the
source then rebuilds only the small layer that installs the package itself (`pip install
--no-deps .`), not torch, DeepSpeed and the rest, and not DeepSpeed's CPU op. pyproject.toml stays
the one list of dependencies.

    python3 docker/requirements.py pyproject.toml trainer > requirements.txt
"""

import sys
import tomllib


def main() -> None:
    path, *extras = sys.argv[1:]
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    print("\n".join(wanted))


if __name__ == "__main__":
    main()
