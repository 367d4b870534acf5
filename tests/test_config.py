"""The configuration system: defaults, YAML, command-line overrides, errors, round trip."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from vlrm.config import (
    ConfigError,
    EvalConfig,
    LearnerConfig,
    PolicyConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    dump_yaml,
    field_docs,
    format_help,
    from_dict,
    load_config,
    parse_cli,
    resolve,
    run_dir,
    save_config,
    split_cli,
    to_dict,
    to_flat_dict,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- defaults


def test_defaults():
    c = load_config()
    assert c == RunConfig()
    assert c.seed == 0 and c.mode == "async" and c.output_dir == "runs" and c.run_name is None
    assert c.total_steps == 200 and c.time_budget_s is None
    assert c.data.root == "data/shapes" and c.data.image_size == 64 and c.data.num_train == 20000
    assert c.policy.model_path == "models/shapes/captioner" and c.policy.dtype == "float32"
    assert c.policy.lora_r == 8 and c.policy.lora_target_modules == ["q_proj", "v_proj"]
    assert c.policy.train_vision is False and c.policy.value_head_use_query is False
    assert c.rollout.num_actors == 2 and c.rollout.backend == "hf" and c.rollout.samples_per_image == 4
    assert c.reward.weights() == {"clip": 1.0, "itm": 0.0, "ref": 0.0, "bad": 1.0, "repeat": 1.0, "length": 0.0,
                                  "binding": 0.0, "phrase_itm": 0.0, "grounded_lm": 0.0, "claims": 0.0}
    comps = c.reward.components
    assert comps["bad"].phrases is None and c.reward.batch_wait_s == 0.05 and comps["ref"].lm_path is None
    assert comps["clip"].path == "models/shapes/reward_clip" and comps["repeat"].ngram == 2
    assert c.data.source == "shapes" and c.data.cache_mb == 256
    assert c.learner.lr == 1e-4 and c.learner.baseline == "value" and c.learner.off_policy == "truncated_is"
    assert c.learner.max_policy_lag == 4 and c.learner.value_lr is None
    assert c.eval.decoding == "greedy" and c.eval.gallery_size is None and c.eval.num_beams == 5
    assert c.cluster.address is None and c.cluster.namespace == "vlrm" and c.cluster.include_dashboard is True


def test_mutable_defaults_are_not_shared():
    a, b = RunConfig(), RunConfig()
    a.policy.lora_target_modules.append("k_proj")
    a.reward.components["clip"].weight = 5.0
    assert b.policy.lora_target_modules == ["q_proj", "v_proj"] and b.reward.components["clip"].weight == 1.0


def test_every_field_is_documented():
    from vlrm.config import BUILTIN_COMPONENTS, ClusterConfig, DataConfig, PluginComponent

    for cls in (RunConfig, DataConfig, PolicyConfig, RolloutConfig, RewardConfig, LearnerConfig, EvalConfig,
                ClusterConfig, PluginComponent, *BUILTIN_COMPONENTS.values()):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, (cls.__name__, missing)
    assert "--rollout.num_actors" in format_help() and "--reward.components.repeat.ngram" in format_help()


# ---------------------------------------------------------------- YAML


def test_yaml_load_partial_and_coercion(tmp_path):
    p = write(
        tmp_path,
        """
mode: local
time_budget_s: 60
rollout:
  num_actors: 3
  temperature: 1        # int accepted for a float field
learner:
  lr: 3e-5              # PyYAML reads this as text; coerced to float
  baseline: rloo
reward:
  components:
    itm: {weight: 0.5}  # blocks merge key by key
    bad: {phrases: [an image of, "a video of"]}
eval:
""",
    )
    c = load_config(p)
    assert c.mode == "local" and c.time_budget_s == 60.0 and isinstance(c.time_budget_s, float)
    assert c.rollout.num_actors == 3 and c.rollout.temperature == 1.0 and isinstance(c.rollout.temperature, float)
    assert c.learner.lr == 3e-5 and c.learner.baseline == "rloo"
    assert c.reward.weights()["itm"] == 0.5 and c.reward.weights()["clip"] == 1.0
    assert c.reward.components["itm"].path == "models/shapes/reward_itm"  # the rest of the block: defaults
    assert c.reward.components["bad"].phrases == ["an image of", "a video of"]
    assert c.eval == EvalConfig()  # empty section: defaults
    assert c.rollout.images_per_batch == 16  # untouched keys keep defaults


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == RunConfig()


def test_yaml_unknown_key_names_key_file_line_and_suggestion(tmp_path):
    p = write(tmp_path, "seed: 1\nrollout:\n  num_actors: 2\n  num_actor: 3\n", "bad.yaml")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "'rollout.num_actor'" in msg and "bad.yaml" in msg and "line 4" in msg
    assert "did you mean 'rollout.num_actors'" in msg
    assert ei.value.key == "rollout.num_actor"


def test_yaml_key_in_wrong_section_suggests_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"'samples_per_image'.*did you mean 'rollout.samples_per_image'"):
        load_config(write(tmp_path, "samples_per_image: 8\n"))


def test_yaml_type_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'learner.normalize_advantages'.*expected bool.*'maybe'"):
        load_config(write(tmp_path, "learner:\n  normalize_advantages: maybe\n"))
    with pytest.raises(ConfigError, match=r"'rollout'.*got 3"):
        load_config(write(tmp_path, "rollout: 3\n"))
    with pytest.raises(ConfigError, match=r"'policy.lora_target_modules'.*expected list\[str\]"):
        load_config(write(tmp_path, "policy:\n  lora_target_modules: q_proj\n"))
    with pytest.raises(ConfigError, match=r"top level"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="could not parse"):
        load_config(write(tmp_path, "a: [1, 2\n"))


# ---------------------------------------------------------------- command line


def test_cli_override_forms():
    c = parse_cli(
        [
            "--rollout.num_actors=3",
            "--reward.num_actors",
            "2",
            "learner.gamma=0.9",
            "--learner.normalize_advantages",  # bare flag: true
            "--policy.train_vision=true",
            "--policy.train_qformer",
            "false",
            "--reward.components.bad.phrases=[\"a picture of\", \"an image of\"]",
            "--policy.lora_target_modules=q_proj,k_proj",
            "--reward.components.itm.weight=0.25",
            "--reward.components.ref.lm_path=null",
            "--run_name=123",  # str field: text kept as is
            "--time_budget_s",
            "30",
            "--learner.lr=1e-5",
            "--learner.max_policy_lag=-0",
        ]
    )
    assert c.rollout.num_actors == 3 and c.reward.num_actors == 2 and c.learner.gamma == 0.9
    assert c.learner.normalize_advantages is True
    assert c.policy.train_vision is True and c.policy.train_qformer is False
    assert c.reward.components["bad"].phrases == ["a picture of", "an image of"]
    assert c.policy.lora_target_modules == ["q_proj", "k_proj"]
    assert c.reward.weights() == {"clip": 1.0, "itm": 0.25, "ref": 0.0, "bad": 1.0, "repeat": 1.0, "length": 0.0,
                                  "binding": 0.0, "phrase_itm": 0.0, "grounded_lm": 0.0, "claims": 0.0}
    assert c.reward.components["ref"].lm_path is None and c.run_name == "123" and c.time_budget_s == 30.0
    assert c.learner.lr == 1e-5 and c.learner.max_policy_lag == 0


def test_cli_config_file_then_overrides(tmp_path):
    p = write(tmp_path, "rollout:\n  num_actors: 5\n  top_k: 7\n")
    c = parse_cli(["--config", str(p), "--rollout.num_actors", "1"])
    assert c.rollout.num_actors == 1 and c.rollout.top_k == 7  # override wins, file still applies
    c = parse_cli([f"--config={p}"])
    assert c.rollout.num_actors == 5
    assert split_cli(["--config", "x.yaml", "--a.b", "1", "--c"]) == ("x.yaml", ["a.b=1", "c"])


def test_cli_nested_mapping_value_and_null_list():
    c = parse_cli(["--rollout={num_actors: 4, top_k: 5}", "--reward.components.bad.phrases", "null"])
    assert c.rollout.num_actors == 4 and c.rollout.top_k == 5 and c.rollout.samples_per_image == 4
    assert c.reward.components["bad"].phrases is None
    c = parse_cli(["--reward.components={ref: {weight: 0.3}, mine: {target: 'my_pkg.r:f', weight: 2, alpha: 1}}"])
    w = c.reward.weights()
    assert w["ref"] == 0.3 and w["mine"] == 2.0 and w["clip"] == 1.0
    assert c.reward.components["mine"].options == {"alpha": 1} and c.reward.components["mine"].target == "my_pkg.r:f"


def test_reward_components_are_checked_per_block():
    with pytest.raises(ConfigError, match=r"'reward.components.clip.pathh'.*did you mean 'reward.components.clip.path'"):
        parse_cli(["--reward.components.clip.pathh=x"])
    with pytest.raises(ConfigError, match=r"'cider'.*not built in.*give it a target"):
        parse_cli(["--reward.components.cider.weight=1"])
    with pytest.raises(ConfigError, match=r"'reward.components.repeat.words'.*'all', 'adjacent' or 'none'"):
        parse_cli(["--reward.components.repeat.words=some"])
    with pytest.raises(ConfigError, match=r"'reward.components.clip.weight'.*finite"):
        parse_cli(["--reward.components.clip.weight=.nan"])
    with pytest.raises(ConfigError, match=r"'reward.clip_path'.*did you mean 'reward.components.clip.path'"):
        parse_cli(["--reward.clip_path=x"])
    assert "itm" not in parse_cli(["--reward.components.itm=null"]).reward.components  # removes a block


def test_unknown_backend_and_source_fail_before_anything_loads():
    with pytest.raises(ConfigError, match=r"'rollout.backend'.*unknown generation backend 'vlm'"):
        parse_cli(["--rollout.backend=vlm"])
    with pytest.raises(ConfigError, match=r"'data.source'.*unknown data source 'coco'.*parquet"):
        parse_cli(["--data.source=coco"])
    assert parse_cli(["--rollout.backend=my_pkg.gen:Backend"]).rollout.backend == "my_pkg.gen:Backend"


def test_cli_type_error_names_key_type_and_value():
    with pytest.raises(ConfigError) as ei:
        parse_cli(["--rollout.num_actors=abc"])
    msg = str(ei.value)
    assert "'rollout.num_actors'" in msg and "expected int" in msg and "'abc'" in msg
    assert "--rollout.num_actors=abc" in msg
    with pytest.raises(ConfigError, match=r"'rollout.num_actors'.*expected int, got 2.5"):
        parse_cli(["--rollout.num_actors=2.5"])
    with pytest.raises(ConfigError, match=r"'learner.lr'.*expected float.*'fast'"):
        parse_cli(["--learner.lr=fast"])
    with pytest.raises(ConfigError, match=r"'reward.components.clip.weight'.*expected float"):
        parse_cli(["--reward.components.clip.weight=high"])
    with pytest.raises(ConfigError, match=r"'learner.lr' needs a value"):
        parse_cli(["--learner.lr", "--seed=1"])


def test_cli_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as ei:
        parse_cli(["--policy.dtype=fp16"])
    msg = str(ei.value)
    assert "'policy.dtype'" in msg and "'fp16'" in msg
    for v in ("'float32'", "'bfloat16'", "'float16'"):
        assert v in msg
    with pytest.raises(ConfigError, match=r"'none', 'truncated_is' or 'vtrace'"):
        parse_cli(["--learner.off_policy=is"])
    assert parse_cli(["--mode", "sync"]).mode == "sync"


def test_cli_unknown_key_names_dotted_key_and_suggestion():
    with pytest.raises(ConfigError) as ei:
        parse_cli(["--rollout.temprature=0.7"])
    msg = str(ei.value)
    assert "'rollout.temprature'" in msg and "did you mean 'rollout.temperature'" in msg
    assert "command-line" in msg
    with pytest.raises(ConfigError, match=r"'rolout'.*did you mean 'rollout'"):
        parse_cli(["--rolout.num_actors=3"])
    with pytest.raises(ConfigError, match=r"unexpected command-line argument 'stray'"):
        parse_cli(["stray"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match=r"'learner.baseline'.*samples_per_image >= 2"):
        load_config(overrides=["learner.baseline=rloo", "rollout.samples_per_image=1"])
    with pytest.raises(ConfigError, match=r"'rollout.top_p'"):
        load_config(overrides=["rollout.top_p=0"])
    for nice in (-1, 20):  # raising priority needs privileges; 19 is the lowest
        with pytest.raises(ConfigError, match=r"'rollout.nice'.*\[0, 19\]"):
            load_config(overrides=[f"rollout.nice={nice}"])
    assert load_config(overrides=["rollout.nice=10"]).rollout.nice == 10
    with pytest.raises(ConfigError, match=r"'reward.nice'.*\[0, 19\]"):
        load_config(overrides=["reward.nice=20"])
    with pytest.raises(ConfigError, match=r"'learner.niceness'"):
        load_config(overrides=["learner.niceness=-5"])
    with pytest.raises(ConfigError, match=r"'reward.cpu_affinity'.*core ids >= 0"):
        load_config(overrides=["reward.cpu_affinity=[0,-1]"])
    assert load_config(overrides=["learner.cpu_affinity=[1]"]).learner.cpu_affinity == [1]
    with pytest.raises(ConfigError, match=r"'learner.data_parallel_workers'.*mode async or sync"):
        load_config(overrides=["mode=local", "learner.data_parallel_workers=2"])
    with pytest.raises(ConfigError, match=r"'learner.micro_batch_size'.*normalize_advantages"):
        load_config(overrides=["learner.micro_batch_size=8", "learner.normalize_advantages=true"])
    with pytest.raises(ConfigError, match=r"'learner.data_parallel_workers'.*normalize_advantages"):
        load_config(overrides=["learner.data_parallel_workers=2", "learner.normalize_advantages=true"])
    assert load_config(overrides=["rollout.top_p=0"], check=False).rollout.top_p == 0.0


def test_help_exits(capsys):
    with pytest.raises(SystemExit) as ei:
        parse_cli(["--help"])
    assert ei.value.code == 0
    assert "--learner.off_policy" in capsys.readouterr().out


# ---------------------------------------------------------------- round trip


def test_round_trip_save_load(tmp_path):
    c = load_config(
        overrides=[
            "run_name=my run #1",
            "reward.components.bad.phrases=['an image of', 'yes', 'null', '1999', 'a: b']",
            "reward.components.clip.prompt_prefix=a photo of ",
            "reward.components.extra.target=my_rewards.py:factory",
            "reward.components.extra.weight=0.125",
            "reward.components.extra.scale=3",
            "learner.lr=3e-7",
            "time_budget_s=1200",
            "cluster.num_cpus=2",
            "policy.dtype=bfloat16",
        ]
    )
    p = save_config(c, tmp_path / "out" / "config.yaml")
    back = load_config(p)
    assert back == c
    assert from_dict(to_dict(c)) == c
    assert yaml.safe_load(p.read_text()) == to_dict(c)  # plain YAML, comments aside
    assert "# number of rollout (generation) actors" in p.read_text()
    assert yaml.safe_load(dump_yaml(c, comments=False)) == to_dict(c)
    flat = to_flat_dict(c)
    assert flat["learner.lr"] == 3e-7 and flat["reward.components.extra"]["weight"] == 0.125
    assert c.reward.components["clip"].prompt_prefix == "a photo of "  # str values keep their spaces


def test_resolve_fills_run_name_and_value_lr():
    c = load_config(overrides=["learner.lr=2e-4", "output_dir=/tmp/x"])
    r = resolve(c, now=0)
    assert c.run_name is None and c.learner.value_lr is None  # input untouched
    assert r.run_name and r.learner.value_lr == 2e-4
    assert run_dir(r) == Path("/tmp/x") / r.run_name
    with pytest.raises(ConfigError):
        run_dir(c)


def test_from_dict_errors_name_key():
    with pytest.raises(ConfigError, match=r"'eval.decodng'.*did you mean 'eval.decoding'"):
        from_dict({"eval": {"decodng": "beam"}})


# ---------------------------------------------------------------- shipped configs


def test_shapes_yaml_loads():
    c = load_config(ROOT / "configs" / "shapes.yaml")
    assert c.data.root == "data/shapes" and c.policy.model_path == "models/shapes/captioner"
    assert c.eval.evaluator_path == "models/shapes/eval_clip" and c.policy.dtype == "float32"


def test_blip2_yaml_loads():
    c = load_config(ROOT / "configs" / "blip2_opt27b.yaml")
    assert c.policy.model_path == "Salesforce/blip2-opt-2.7b" and c.policy.dtype == "bfloat16"
    assert c.policy.lora_target_modules == ["q_proj", "k_proj", "v_proj", "out_proj"]
    comps = c.reward.components
    assert comps["itm"].path == "Salesforce/blip2-itm-vit-g" and "ViT-L-14" in comps["clip"].path
    assert c.cluster.dashboard_host == "127.0.0.1"  # no preset exposes the dashboard
    assert c.rollout.num_gpus == 1 and c.reward.num_gpus == 1 and c.learner.num_gpus == 1
    assert c.rollout.max_new_tokens == 60 and c.eval.max_new_tokens == 60


def test_pinning_to_a_core_the_node_lacks_names_the_key():
    from vlrm.raytools import pin_to_cores

    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ValueError, match=rf"learner.cpu_affinity=\[{missing}\]: core\(s\) \[{missing}\] are not available"):
        pin_to_cores([missing], "learner.cpu_affinity")
    assert pin_to_cores([], "learner.cpu_affinity") == sorted(os.sched_getaffinity(0))  # empty: left as it is
