"""`megaclass COMMAND --help` prints its help for every command (argparse %-formats help strings: a bare
`%` in one, e.g. "30% noise", crashed `megaclass synth --help` with a TypeError)."""
import argparse

import pytest

from megaclass import cli


def _commands():
    out = [(name,) for name in cli.COMMANDS]
    return out + [("bench", name) for name in ("ce", "weights", "knn", "lm", "train", "data", "shards", "input")]


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: megaclass " + " ".join(command)) and "options:" in out


def test_the_bench_list_here_is_every_benchmark():
    """The list above must not fall behind the benchmarks `megaclass bench` registers."""
    import megaclass.bench.cli as bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    inner = next(a for a in sub.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(inner.choices) == sorted(name for command in _commands() if len(command) == 2
                                           for name in command[1:])
