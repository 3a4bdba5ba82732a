"""`python -m vitexp.shards`: the command is vitexp/commands/shards.py. `-m` needs a module path, so
this file only hands over to `vitexp.commands.run` (and importing it imports nothing)."""

if __name__ == "__main__":
    from vitexp.commands import run

    run("shards")
