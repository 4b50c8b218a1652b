import json

import pytest

from sparse_compiler.cli import main


def make_mlp():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    return model, (torch.randn(4, 256),)


def failing_factory():
    raise RuntimeError("no weights here")


def test_report_command_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["report", "test_cli:make_mlp", "--density", "0.25", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 of 2 linear layers sparse" in printed
    data = json.loads(out.read_text())
    assert [layer["decision"] for layer in data["layers"]] == ["sparse", "dense"]
    assert "not a multiple of block_size" in data["layers"][1]["reason"]


@pytest.mark.parametrize(
    "target,needle",
    [
        ("no_colon", "MODULE:FACTORY"),
        ("not_a_module_xyz:f", "cannot import"),
        ("test_cli:missing", "no attribute"),
        ("test_cli:failing_factory", "no weights here"),
    ],
)
def test_report_command_bad_targets(target, needle):
    with pytest.raises(SystemExit, match=needle):
        main(["report", target])


def test_bad_option_value_is_reported():
    with pytest.raises(SystemExit, match="density"):
        main(["report", "test_cli:make_mlp", "--density", "2"])
