"""Config loading: presets, overrides, and errors that name the dotted path and the allowed keys."""

from pathlib import Path

import pytest

from distil.config import Config, config_from_dict, config_to_yaml, load_config
from distil.errors import DistilError

PRESETS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_presets_including_debug():
    assert "debug" in {p.stem for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.output.name == preset.stem
    # The resolved config round-trips through YAML.
    import yaml

    again = config_from_dict(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg


def test_set_overrides_any_field():
    cfg = load_config(None, ["train.steps=7", "loss.kind=reverse_kl", "train.lr=1e-3", "data.max_docs=null",
                             "student.tie_embeddings=false", "teacher.source=none", "loss.kd_weight=0", "loss.ce_weight=1"])
    assert cfg.train.steps == 7 and cfg.loss.kind == "reverse_kl" and cfg.train.lr == 1e-3
    assert cfg.data.max_docs is None and cfg.student.tie_embeddings is False
    assert isinstance(cfg.loss.kd_weight, float)


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(DistilError) as e:
        config_from_dict({"train": {"stpes": 3}, "teacher": {"source": "none"}, "loss": {"kd_weight": 0, "ce_weight": 1}})
    assert "train.stpes" in str(e.value) and "steps" in str(e.value) and "batch_size" in str(e.value)
    with pytest.raises(DistilError, match="unknown config section 'trian'"):
        load_config(None, ["trian.steps=3"])
    with pytest.raises(DistilError, match="unknown config key 'model'"):
        config_from_dict({"model": {}})


def test_wrong_type_names_path():
    with pytest.raises(DistilError, match=r"train\.steps = 'many' should be int"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(DistilError, match=r"loss\.fused = 3 should be true or false"):
        load_config(None, ["loss.fused=3"])


@pytest.mark.parametrize("override, message", [
    ("loss.kind=kl", "loss.kind"),
    ("train.steps=0", "train.steps"),
    ("loss.temperature=-1", "loss.temperature"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("student.n_heads=3", "divisible"),
])
def test_value_checks_name_the_field(override, message):
    with pytest.raises(DistilError, match=message):
        load_config(None, [override, "teacher.source=none", "loss.kd_weight=0", "loss.ce_weight=1"])


def test_vocab_parallel_head_needs_an_untied_head_and_concat_packing():
    base = ["teacher.source=none", "loss.kd_weight=0", "loss.ce_weight=1", "loss.parallel=vocab"]
    with pytest.raises(DistilError, match="tie_embeddings: false"):
        load_config(None, base)
    with pytest.raises(DistilError, match="concat packing"):
        load_config(None, [*base, "student.tie_embeddings=false", "data.packing=stream"])
    assert load_config(None, [*base, "student.tie_embeddings=false"]).loss.parallel == "vocab"


def test_hybrid_stages_are_checked():
    base = ["teacher.path=t"]
    assert load_config(None, [*base, "hybrid.stages=[1, 5, 25, 45]"]).hybrid.stages == [1, 5, 25, 45]
    assert load_config(None, [*base, "hybrid.layers=[3, 1]"]).hybrid.stages == [2]  # explicit layers: one stage
    for override, message in [("hybrid.stages=[5, 5]", "increasing"), ("hybrid.stages=[0, 2]", "increasing"),
                              ("hybrid.layers=[1, 1]", "distinct"), ("hybrid.placement=middle", "hybrid.placement"),
                              ("hybrid.mixer=mamba3", "hybrid.mixer"), ("hybrid.init=zeros", "hybrid.init"),
                              ("hybrid.d_state=0", "hybrid.d_state")]:
        with pytest.raises(DistilError, match=message):
            load_config(None, [*base, override])
    with pytest.raises(DistilError, match="one stage"):
        load_config(None, [*base, "hybrid.layers=[1, 2]", "hybrid.stages=[1, 2]"])
    with pytest.raises(DistilError, match="student.path"):  # nothing to convert
        load_config(None, ["teacher.source=none", "loss.kd_weight=0", "loss.ce_weight=1", "hybrid.stages=[1]"])


def test_jsd_beta_endpoints_rejected_in_config():
    with pytest.raises(DistilError, match="reverse_kl"):
        load_config(None, ["loss.kind=jsd", "loss.beta=0", "teacher.path=x"])


def test_teacher_needed_for_kd():
    with pytest.raises(DistilError, match="teacher.path is required"):
        load_config(None, [])
    with pytest.raises(DistilError, match="kd_weight"):
        load_config(None, ["teacher.source=none"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(DistilError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(DistilError, match="not valid YAML"):
        load_config(bad)


def test_docs_mention_every_config_field():
    import dataclasses

    from distil import config as c

    text = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    for section in dataclasses.fields(Config):
        assert f"## {section.name}" in text, section.name
    for cls in (c.TeacherConfig, c.ApiConfig, c.StudentConfig, c.DataConfig, c.LossConfig, c.TrainConfig, c.EvalConfig,
                c.HybridConfig, c.OutputConfig, c.AlignConfig, c.RolloutConfig, c.CrossTokenizerConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in text, f"{cls.__name__}.{f.name} is not documented in docs/config.md"
    for preset in PRESETS:
        assert preset.name in text, preset.name


def test_every_choice_is_a_literal_checked_in_one_place():
    """Choices are Literal[...] annotations: one check covers YAML, --set and Python construction."""
    import dataclasses
    import typing

    from distil import config as c

    literal = 0
    for cls in (c.TeacherConfig, c.DataConfig, c.LossConfig, c.TrainConfig, c.HybridConfig, c.AlignConfig):
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is typing.Literal:
                literal += 1
                default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
                assert default in typing.get_args(tp), (cls.__name__, name)
    assert literal >= 15
    with pytest.raises(DistilError, match=r"train\.schedule = 'linear' is not one of cosine, wsd, constant"):
        load_config(None, ["train.schedule=linear", "teacher.path=t"])
    with pytest.raises(DistilError, match=r"data\.source = 'csv' is not one of"):
        c.DataConfig(source="csv", path="x")  # built in Python, not from YAML: the same check
    with pytest.raises(DistilError, match=r"loss\.kind = 'jsd' is not one of forward_kl, reverse_kl, soft_ce"):
        load_config(None, ["loss.kind=jsd", "loss.topk=8", "teacher.path=t"])


def test_api_section_and_the_old_flat_keys(caplog):
    cfg = load_config(None, ["teacher.source=api", "api.base=http://h/v1", "api.model=m", "api.topk=7"])
    assert (cfg.api.base, cfg.api.model, cfg.api.topk) == ("http://h/v1", "m", 7)
    with caplog.at_level("WARNING", logger="distil"):
        old = load_config(None, ["teacher.source=api", "teacher.api_base=http://h/v1", "teacher.api_model=m",
                                 "teacher.api_topk=7"])
    assert old == cfg
    assert "teacher.api_base is now api.base" in caplog.text
    with pytest.raises(DistilError, match="api.base and api.model are required"):
        load_config(None, ["teacher.source=api"])
    with pytest.raises(DistilError, match="both set"):
        load_config(None, ["teacher.source=api", "teacher.api_base=a", "api.base=b", "api.model=m"])
