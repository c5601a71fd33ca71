"""Search settings: one declaration per setting (type, valid values, help), from which come the
recipe checks, `ellava search --set KEY=VALUE` and the settings listed in `--help`."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import pytest

from ellava_jax.cli import main
from ellava_jax.errors import UserError
from ellava_jax.search import settings as S
from ellava_jax.search.settings import (
    ABLATIONS,
    SearchSettings,
    SettingError,
    UnknownSetting,
    command_line_overrides,
    load_settings,
    setting,
)


def _load(*sets: str, flags=None, recipe: str = "toy") -> SearchSettings:
    overrides, origins = command_line_overrides(sets, flags)
    return load_settings(recipe, overrides, origins=origins)


def test_every_setting_is_declared_with_type_and_range():
    """Each field carries its declaration: help, a supported type, a range for numbers,
    choices only on strings; the defaults pass their own checks; ablations name settings."""
    S.check_declarations()
    hints = typing.get_type_hints(SearchSettings)
    decl = S.declarations()
    assert list(decl) == [f.name for f in dataclasses.fields(SearchSettings)]
    for f in dataclasses.fields(SearchSettings):
        d = decl[f.name]
        assert d["help"], f.name
        assert d["type"] == hints[f.name] and d["type_text"], f.name
        numeric = any(t in (int, float) for t in S._options(hints[f.name]))
        if numeric:
            assert d["range"] is not None, f"{f.name}: a number without a range"
        if d["choices"]:
            assert d["default"] in d["choices"], f.name
    SearchSettings()  # the defaults are valid
    for changes in ABLATIONS.values():
        S.check_keys(changes, "ABLATIONS")
    # an undeclared field is a programming error
    with pytest.raises(TypeError, match=r"Bad\.x: declare it"):

        @dataclass(frozen=True)
        class Bad:
            x: int = 3

        S.check_declarations(Bad)
    with pytest.raises(TypeError, match="needs a range"):

        @dataclass(frozen=True)
        class NoRange:
            x: int = setting(3, "a number")

        S.check_declarations(NoRange)


def test_set_int_float_bool_null_path(tmp_path):
    text = tmp_path / "ptb.txt"
    s = _load(
        "rounds=3",
        "p0=0.6",
        "projector_lr=1e-3",  # YAML 1.1 reads 1e-3 as text; a number setting takes it
        "streaming=true",
        "eval_limit=null",
        f"proxy_text={text}",
        "model=2024",  # a setting that takes text keeps the text
        "eta=1",  # an int where a float goes
    )
    assert s.rounds == 3 and isinstance(s.rounds, int)
    assert s.p0 == 0.6 and s.projector_lr == 1e-3
    assert s.streaming is True and s.eval_limit is None
    assert s.proxy_text == str(text) and s.model == "2024"
    assert s.eta == 1.0 and isinstance(s.eta, float)
    assert _load("proxy_text=null").proxy_text is None
    assert _load("image_root=/data/run #1: a").image_root == "/data/run #1: a"  # text as given
    # the dedicated flags are sugar for --set; the same key twice with two values is refused
    assert _load(flags={"p0": "0.4", "seed": "7"}).seed == 7
    assert _load("p0=0.4", flags={"p0": "0.4"}).p0 == 0.4
    with pytest.raises(UserError, match=r"p0 is given twice: --p0 0\.3 and --set p0=0\.4"):
        _load("p0=0.4", flags={"p0": "0.3"})
    with pytest.raises(UserError, match=r"--set p0: expected KEY=VALUE"):
        _load("p0")
    with pytest.raises(UserError, match=r"--set p0=: no value \(write null for none\)"):
        _load("p0=")


def test_unknown_key_is_refused_by_name_with_the_closest(tmp_path):
    with pytest.raises(UnknownSetting, match=r"--set populaton=16: .*'populaton'.*population\?"):
        _load("populaton=16")
    with pytest.raises(UnknownSetting, match=r"--set zzz=1: unknown setting\(s\) \['zzz'\]"):
        _load("zzz=1")
    p = tmp_path / "r.yaml"
    p.write_text("p0: 0.5\npopulaton: 16\nprojector_step: 3\n")
    with pytest.raises(
        UnknownSetting,
        match=r"r\.yaml: unknown setting\(s\) \['populaton', 'projector_step'\]; closest known: "
        r"populaton -> population, projector_step -> projector_steps",
    ):
        load_settings(str(p))


def test_out_of_range_via_set_names_set_and_recipe(tmp_path):
    with pytest.raises(
        SettingError, match=r"^--set rounds=-1: must be >= 0 \(overriding .*toy\.yaml\)"
    ):
        _load("rounds=-1")
    with pytest.raises(SettingError, match=r"^--p0 1\.5: must be in \(0, 1\)"):
        _load(flags={"p0": "1.5"})
    with pytest.raises(SettingError, match=r"^--set granularity=block: expected one of"):
        _load("granularity=block")
    # a rule across settings names the argument that broke it
    with pytest.raises(SettingError, match=r"^--set population=4: .*top_k=8 exceeds population=4"):
        _load("population=4")
    # a chunk of rows larger than the proxy's parts cannot run
    with pytest.raises(
        SettingError, match=r"^--set row_chunk=65: exceeds the proxy's 64 rows \(overriding"
    ):
        _load("row_chunk=65")
    assert _load("row_chunk=8").row_chunk == 8
    with pytest.raises(SettingError, match=r"^--set candidate_chunk=17: exceeds population=16"):
        _load("candidate_chunk=17")
    # a path that cannot stream: host storage or offloaded layer inputs without streaming
    with pytest.raises(
        SettingError, match=r"^--set database_storage=host: needs streaming=true \(host storage"
    ):
        _load("database_storage=host")
    with pytest.raises(SettingError, match=r"^--set projector_offload=true: needs streaming=true"):
        _load("projector_offload=true")
    ok = _load("database_storage=host", "streaming=true", "projector_offload=true")
    assert ok.projector_offload and ok.database_storage == "host"
    # in a recipe, the error names the file
    p = tmp_path / "r.yaml"
    p.write_text("rounds: -1\n")
    with pytest.raises(SettingError, match=r"r\.yaml: search setting rounds=-1: must be >= 0"):
        load_settings(str(p))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(SettingError, match=r"--set rounds=abc: expected an integer, got str"):
        _load("rounds=abc")
    with pytest.raises(SettingError, match=r"--set top_k=1\.5: expected an integer, got float"):
        _load("top_k=1.5")
    with pytest.raises(SettingError, match=r"--set streaming=maybe: expected a boolean, got str"):
        _load("streaming=maybe")
    with pytest.raises(SettingError, match=r"--set model=null: expected a string, got null"):
        _load("model=null")
    p = tmp_path / "r.yaml"
    p.write_text("projector_lr: 1e-4\n")  # YAML 1.1: text, and the error says so
    with pytest.raises(SettingError, match=r"r\.yaml: .*projector_lr='1e-4'.*write it with a dot"):
        load_settings(str(p))


@dataclass(frozen=True)
class _Nested:
    """A settings class with the mapping and list values other settings (a mesh, selection
    stages) will need, checked by the same code as SearchSettings."""

    mesh: dict[str, int] = setting({"data": 1}, "devices per mesh axis", ge=1)
    stages: tuple[float, ...] = setting((0.5,), "sparsity of each stage", gt=0, lt=1)
    names: list[str] | None = setting(None, "which", choices=("a", "b"))

    def __post_init__(self):
        S.check_fields(self)


def test_nested_and_list_values():
    S.check_declarations(_Nested)
    o, _ = command_line_overrides(
        ["mesh={data: 2, model: 4}", "stages=[0.3, 0.5]", "names=[a, b]"], cls=_Nested
    )
    n = _Nested(**o)
    assert n.mesh == {"data": 2, "model": 4} and n.stages == (0.3, 0.5) and n.names == ["a", "b"]
    with pytest.raises(SettingError, match=r"mesh=\{'data': 0\}: mesh\.data must be >= 1"):
        _Nested(mesh={"data": 0})
    with pytest.raises(SettingError, match=r"mesh\.data: expected an integer, got str"):
        _Nested(mesh={"data": "x"})
    with pytest.raises(SettingError, match=r"stages\[1\] must be in \(0, 1\)"):
        _Nested(stages=[0.5, 1.0])
    with pytest.raises(SettingError, match=r"names\[0\] expected one of"):
        _Nested(names=["c"])
    with pytest.raises(SettingError, match=r"stages=0\.5: expected a list of float, got float"):
        _Nested(stages=0.5)
    assert "mesh" in S.describe_settings(cls=_Nested)


def test_search_command_takes_set_and_lists_settings(tmp_path, capsys, monkeypatch):
    # --help lists every setting with its type, range and default
    with pytest.raises(SystemExit) as e:
        main(["search", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in S.setting_names():
        assert f"\n  {name} " in out, name
    assert "p0                        float in (0, 1), default 0.5" in out
    assert "--set KEY=VALUE" in out and "toy-p05" in out  # shipped recipe names
    # --set reaches the search (the search itself is replaced: this checks the command layer)
    seen = {}

    def fake_run_search(settings, out_dir, **kw):
        seen["settings"] = settings
        return {
            "policy": [0.5],
            "mean_sparsity": 0.5,
            "measured_sparsity": 0.5,
            "accuracy": {},
            "obs_calls": 0,
        }

    import ellava_jax.app.search as app_search

    monkeypatch.setattr(app_search, "run_search", fake_run_search)
    argv = ["search", "--config", "tiny", "--out", str(tmp_path / "r"), "--no-eval"]
    argv += ["--set", "population=4", "--set", "top_k=2", "--rounds", "1", "--ablation", "no_evo"]
    assert main(argv) == 0
    s = seen["settings"]
    assert (s.population, s.top_k, s.rounds, s.projector_steps) == (4, 2, 1, 0)
    # errors are one line, exit 2, naming the argument
    capsys.readouterr()
    bad = ["search", "--config", "tiny", "--out", str(tmp_path / "b"), "--set", "rounds=-1"]
    assert main(bad) == 2
    assert "--set rounds=-1: must be >= 0" in capsys.readouterr().err
    assert main(["search", "--config", "nope", "--out", str(tmp_path / "c")]) == 2
    assert "shipped recipes: " in capsys.readouterr().err
