"""`python -m vitexp` and the `vitexp` console script (pyproject.toml): training, the command in
vitexp/commands/train.py. `-m` needs a module path, so this file only hands over to
`vitexp.commands.run`, which checks the command line before torch is imported."""

from vitexp.commands import run


def main() -> None:
    run("train")


if __name__ == "__main__":
    main()
