"""The job file: what a tenant writes, what the market reads, and what it refuses."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from market.jobspec import (
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_RUN_CAP,
    DEFAULT_TRIAL_TIMEOUT_MS,
    MAX_GRID_POINTS,
    JobError,
    JobSpec,
    args_json,
    parse_credits,
    parse_duration_ms,
    parse_job,
    parse_size,
    render_command,
    spec_hash,
    uses_args_json_file,
)
from protocol.errors import MercatoError

FULL = """
name: digits-svm
kind: sweep
sweep:
  program: train.py
  method: bayes
  metric: {name: val_loss, goal: minimize}
  run_cap: 24
  early_terminate: {type: hyperband, min_iter: 3, eta: 3}
  parameters:
    C: {distribution: log_uniform_values, min: 0.001, max: 100}
    kernel: {values: [rbf, linear]}
    gamma: {value: scale}
resources: {accelerator: h100, devices_per_trial: 2, min_memory: "16GB"}
budget: {max_price: "2.5 credits/device-hour", max_spend: "10 credits"}
limits: {trial_timeout: "10m", max_output: "10MB", retries: 3, network: true}
"""

# The example of W&B's "Define a sweep configuration" guide (docs.wandb.ai/guides/
# sweeps/define-sweep-configuration), as people keep it in sweep.yaml.
WANDB_SWEEP = """
program: train.py
name: sweepdemo
project: my-first-sweep
entity: my-team
description: a demo
method: bayes
metric:
  goal: minimize
  name: val_loss
parameters:
  learning-rate:
    min: 0.00001
    max: 0.1
  optimizer:
    values: ["adam", "sgd"]
  hidden_layer_size:
    values: [96, 128, 148]
  epochs:
    value: 27
early_terminate:
  type: hyperband
  s: 2
  eta: 3
  max_iter: 27
command:
  - ${env}
  - python3
  - ${program}
  - ${args}
"""


def problems(text: str) -> dict[str, str]:
    """Path -> message of every problem parse_job reports for ``text``."""
    with pytest.raises(JobError) as info:
        parse_job(textwrap.dedent(text), "job.yaml")
    return {p.path: p.message for p in info.value.problems}


def sweep_file(parameters: str, method: str = "random", extra: str = "") -> str:
    """A plain W&B sweep with the given (indented YAML) parameters."""
    return f"program: train.py\nmethod: {method}\n{extra}parameters:\n{parameters}"


class TestParse:
    def test_full_job_file_reads_with_human_units_turned_into_integers(self) -> None:
        spec = parse_job(FULL)
        assert spec.name == "digits-svm"
        assert spec.kind == "sweep"
        assert spec.resources.accelerator == "H100-SXM"  # alias resolved through the catalog
        assert spec.resources.devices_per_trial == 2
        assert spec.resources.min_memory_bytes == 16 * 10**9
        assert spec.budget.max_price == 2_500_000  # micro-credits per device-hour
        assert spec.budget.max_spend == 10_000_000
        assert spec.limits.trial_timeout_ms == 600_000
        assert spec.limits.max_output_bytes == 10 * 10**6
        assert spec.limits.retries == 3
        assert spec.limits.network is True
        sweep = spec.sweep_config
        assert sweep.method == "bayes"
        assert sweep.metric is not None
        assert sweep.metric.name == "val_loss"
        assert sweep.run_cap == 24
        assert sweep.early_terminate is not None
        assert sweep.early_terminate.min_resource == 3

    def test_requirement_for_the_order_follows_resources(self) -> None:
        req = parse_job(FULL).requirement()
        assert (req.kind, req.model) == ("gpu", "H100-SXM")
        assert req.devices_per_unit == 2
        assert req.min_memory_bytes == 16 * 10**9
        plain = parse_job(
            sweep_file("  a: {values: [1]}\n", extra="resources: {accelerator: ipu}\n")
        )
        assert (plain.requirement().kind, plain.requirement().model) == ("ipu", None)

    def test_defaults_when_the_file_says_little(self) -> None:
        spec = parse_job(sweep_file("  a: {values: [1, 2]}\n"))
        assert spec.name == "train"  # from the program
        assert spec.kind == "sweep"
        assert spec.resources.accelerator == "any"
        assert spec.budget.max_price is None
        assert spec.budget.max_spend is None
        assert spec.limits.trial_timeout_ms == DEFAULT_TRIAL_TIMEOUT_MS
        assert spec.limits.max_output_bytes == DEFAULT_MAX_OUTPUT_BYTES
        assert spec.limits.network is False

    def test_a_wandb_sweep_file_parses_unchanged(self) -> None:
        spec = parse_job(WANDB_SWEEP, "sweep.yaml")
        sweep = spec.sweep_config
        assert spec.name == "sweepdemo"
        assert sweep.method == "bayes"
        assert sweep.command == ["${env}", "python3", "${program}", "${args}"]
        lr = sweep.parameters["learning-rate"]
        assert (lr.distribution, lr.min, lr.max) == ("uniform", 0.00001, 0.1)
        assert sweep.parameters["epochs"].distribution == "constant"
        assert sweep.parameters["optimizer"].values == ["adam", "sgd"]
        assert sweep.early_terminate is not None
        assert sweep.early_terminate.bands() == (3, 9)  # W&B: 27 / 3**2 and 27 / 3
        notes = " ".join(spec.notes())
        assert "'project'" in notes
        assert "'entity'" in notes
        assert "'description'" in notes

    def test_wandb_file_and_sweep_section_give_the_same_spec(self) -> None:
        nested = "name: sweepdemo\nsweep:\n" + textwrap.indent(WANDB_SWEEP, "  ")
        assert parse_job(nested) == parse_job(WANDB_SWEEP)
        assert spec_hash(parse_job(nested)) == spec_hash(parse_job(WANDB_SWEEP))

    def test_resources_budget_and_limits_may_sit_next_to_wandb_keys(self) -> None:
        spec = parse_job(WANDB_SWEEP + "budget: {max_spend: 3}\nlimits: {trial_timeout: 90}\n")
        assert spec.budget.max_spend == 3_000_000  # a bare number is credits
        assert spec.limits.trial_timeout_ms == 90_000  # a bare number is seconds

    def test_distributions_are_inferred_as_wandb_does(self) -> None:
        spec = parse_job(
            sweep_file(
                "  cat: {values: [a, b]}\n"
                "  const: {value: 3}\n"
                "  ints: {min: 1, max: 4}\n"
                "  floats: {min: 0.0, max: 1}\n"
                "  q: {distribution: q_uniform, min: 0, max: 10}\n"
                "  n: {distribution: normal}\n"
            )
        )
        params = spec.sweep_config.parameters
        assert params["cat"].distribution == "categorical"
        assert params["const"].distribution == "constant"
        assert params["ints"].distribution == "int_uniform"
        assert params["floats"].distribution == "uniform"
        assert params["q"].q == 1
        assert (params["n"].mu, params["n"].sigma) == (0, 1)

    def test_nested_parameters(self) -> None:
        spec = parse_job(
            sweep_file(
                "  optimizer:\n"
                "    parameters:\n"
                "      lr: {min: 0.001, max: 0.1}\n"
                "      momentum: {values: [0.9, 0.99]}\n"
            )
        )
        paths = [path for path, _ in spec.sweep_config.leaves()]
        assert paths == [("optimizer", "lr"), ("optimizer", "momentum")]

    def test_exponent_notation_is_a_float_not_a_string(self) -> None:
        # YAML 1.1 (PyYAML) reads 1e-3 as the string "1e-3"; sweep files are full of it.
        spec = parse_job(
            sweep_file("  lr: {distribution: log_uniform_values, min: 1e-5, max: 1e-1}\n")
        )
        lr = spec.sweep_config.parameters["lr"]
        assert (lr.min, lr.max) == (1e-5, 1e-1)

    def test_pyyaml_itself_is_left_as_it_was(self) -> None:
        parse_job(sweep_file("  lr: {values: [1e-3]}\n"))
        assert yaml.safe_load("x: 1e-3") == {"x": "1e-3"}  # other YAML readers unchanged

    def test_dates_stay_text(self) -> None:
        spec = parse_job(sweep_file("  day: {values: [2024-01-01]}\n"))
        assert spec.sweep_config.parameters["day"].values == ["2024-01-01"]

    def test_random_without_run_cap_gets_the_default_and_says_so(self) -> None:
        spec = parse_job(sweep_file("  a: {min: 0.0, max: 1.0}\n"))
        assert spec.sweep_config.trial_cap == DEFAULT_RUN_CAP
        assert any("run_cap" in n for n in spec.notes())

    def test_grid_cap_is_the_grid_size_or_run_cap(self) -> None:
        params = "  a: {values: [1, 2, 3]}\n  b: {min: 1, max: 4}\n"
        assert parse_job(sweep_file(params, "grid")).sweep_config.trial_cap == 12
        capped = sweep_file(params, "grid", extra="run_cap: 5\n")
        assert parse_job(capped).sweep_config.trial_cap == 5

    def test_spec_is_frozen(self) -> None:
        spec = parse_job(FULL)
        with pytest.raises(ValueError, match="frozen"):
            spec.name = "other"  # type: ignore[misc]


class TestProblems:
    def test_error_is_typed_with_the_bad_job_code(self) -> None:
        with pytest.raises(JobError) as info:
            parse_job("method: nope\nprogram: t.py\nparameters: {a: {values: [1]}}", "job.yaml")
        assert isinstance(info.value, MercatoError)
        assert info.value.code == "bad_job"
        assert "job.yaml" in str(info.value)
        assert "method" in str(info.value)

    def test_unknown_method(self) -> None:
        found = problems(sweep_file("  a: {values: [1]}\n", method="hillclimb"))
        assert "grid" in found["method"]
        assert "bayes" in found["method"]

    def test_grid_over_a_continuous_distribution(self) -> None:
        found = problems(
            sweep_file("  C: {distribution: log_uniform_values, min: 0.1, max: 1}\n", "grid")
        )
        assert "grid search needs a finite set of values" in found["parameters.C"]

    def test_grid_over_int_and_q_uniform_is_fine(self) -> None:
        text = sweep_file(
            "  a: {distribution: int_uniform, min: 1, max: 3}\n"
            "  b: {distribution: q_uniform, min: 0, max: 1, q: 0.25}\n",
            "grid",
        )
        assert parse_job(text).sweep_config.grid_size() == 3 * 5

    def test_min_above_max(self) -> None:
        found = problems(sweep_file("  lr: {min: 0.5, max: 0.1}\n"))
        assert "must be <= max" in found["parameters.lr.min"]

    def test_log_uniform_values_needs_a_positive_min(self) -> None:
        found = problems(sweep_file("  lr: {distribution: log_uniform_values, min: 0, max: 1}\n"))
        assert "min > 0" in found["parameters.lr.min"]

    def test_bayes_needs_a_metric(self) -> None:
        found = problems(sweep_file("  a: {min: 0.0, max: 1.0}\n", "bayes"))
        assert "metric" in found["metric"]

    def test_bad_price_text(self) -> None:
        found = problems(WANDB_SWEEP + "budget: {max_price: cheap}\n")
        assert "cannot read 'cheap' as credits" in found["budget.max_price"]

    def test_negative_timeout(self) -> None:
        found = problems(WANDB_SWEEP + "limits: {trial_timeout: -10}\n")
        assert "must be positive" in found["limits.trial_timeout"]

    def test_unknown_top_level_key_suggests_the_right_one(self) -> None:
        found = problems(FULL + "limit: {retries: 1}\n")
        assert found["limit"] == "unknown key; did you mean 'limits'?"

    def test_unknown_key_in_a_parameter(self) -> None:
        found = problems(sweep_file("  a: {values: [1], probabilites: [1]}\n"))
        assert "did you mean 'probabilities'" in found["parameters.a.probabilites"]

    def test_float_where_an_int_is_needed(self) -> None:
        found = problems(sweep_file("  a: {values: [1]}\n", extra="run_cap: 2.5\n"))
        assert "integer" in found["run_cap"]
        found = problems(sweep_file("  a: {distribution: int_uniform, min: 1, max: 4.5}\n"))
        assert "needs an integer" in found["parameters.a.max"]

    def test_yaml_syntax_error_names_line_and_column(self) -> None:
        found = problems("program: t.py\nmethod: grid\nparameters: {a: [1, 2}\n")
        (where,) = found
        assert where.startswith("line 3, column ")
        assert "YAML" in found[where]

    def test_flow_list_of_macros_gets_a_hint(self) -> None:
        found = problems(
            sweep_file("  a: {values: [1]}\n", extra="command: [${env}, ${program}]\n")
        )
        assert "quote command macros" in next(iter(found.values()))

    def test_repeated_key(self) -> None:
        found = problems("method: grid\nmethod: random\n")
        assert found["line 2, column 1"] == "YAML: the key 'method' appears twice"

    def test_aliases_are_refused(self) -> None:
        found = problems("a: &x [1, 2]\nb: *x\n")
        assert "aliases" in next(iter(found.values()))

    def test_empty_and_non_mapping_files(self) -> None:
        assert "empty" in problems("")["(file)"]
        assert "mapping" in problems("- 1\n- 2\n")["(file)"]

    def test_every_problem_is_listed_at_once_with_its_path(self) -> None:
        found = problems(
            """
            name: x
            colour: blue
            sweep:
              program: train.py
              method: random
              run_cap: 0
              parameters:
                lr: {distribution: log_uniform_values, min: -1, max: 1}
                bs: {distribution: int_uniform, min: 64, max: 16}
                p: {values: [a, b], probabilities: [0.5, 0.2]}
                q: {distribution: uniform, min: 0.0, max: 1.0, q: 0.1}
            resources: {accelerator: h1000, min_memory: lots}
            budget: {max_price: "1.2345678 credits", max_spend: "5 credits/hour"}
            limits: {trial_timeout: 10x, max_output: -1}
            """
        )
        assert set(found) == {
            "colour",
            "sweep.run_cap",
            "sweep.parameters.lr.min",
            "sweep.parameters.bs.min",
            "sweep.parameters.p.probabilities",
            "sweep.parameters.q.q",
            "resources.accelerator",
            "resources.min_memory",
            "budget.max_price",
            "budget.max_spend",
            "limits.trial_timeout",
            "limits.max_output",
        }
        assert "H100-SXM" in found["resources.accelerator"]  # the catalog's suggestion
        assert "6 decimals" in found["budget.max_price"]
        assert "rate" in found["budget.max_spend"]
        assert "does not apply" in found["sweep.parameters.q.q"]

    def test_unsupported_wandb_features_say_so(self) -> None:
        found = problems(sweep_file("  a: {values: [1]}\n", method="custom"))
        assert "not supported" in found["method"]
        found = problems(sweep_file("  a: {values: [1]}\n", extra="job: me/job:v0\n"))
        assert "Launch" in found["job"]

    def test_macros_must_be_known(self) -> None:
        command = "command:\n  - ${env}\n  - ${python}\n  - --x=${envvar:A B}\n"
        found = problems(sweep_file("  a: {values: [1]}\n", extra=command))
        assert "unknown macro ${python}" in found["command[1]"]
        assert "environment variable name" in found["command[2]"]

    def test_program_is_required_by_the_default_command(self) -> None:
        found = problems("method: random\nparameters: {a: {values: [1]}}\n")
        assert "${program}" in found["program"]

    def test_grid_with_probabilities_or_too_many_points(self) -> None:
        found = problems(sweep_file("  a: {values: [1, 2], probabilities: [0.5, 0.5]}\n", "grid"))
        assert "remove probabilities" in found["parameters.a.probabilities"]
        big = f"  a: {{min: 1, max: {MAX_GRID_POINTS}}}\n  b: {{values: [1, 2]}}\n"
        assert "grid points" in problems(sweep_file(big, "grid"))["parameters"]

    def test_hyperband_needs_min_iter_or_max_iter_and_s(self) -> None:
        extra = "metric: {name: loss}\nearly_terminate: {type: hyperband, eta: 3}\n"
        found = problems(sweep_file("  a: {values: [1]}\n", extra=extra))
        assert "min_iter" in found["early_terminate.min_iter"]

    def test_a_training_kind_needs_its_training_section(self) -> None:
        found = problems("kind: training\n" + WANDB_SWEEP)
        assert "required for kind training" in found["training"]

    def test_a_training_job_parses_with_its_shape(self) -> None:
        spec = parse_job(
            "kind: training\n"
            "training:\n"
            "  world_size: 8\n"
            "  model: {parameters: 1e9, gradient_bytes: 2}\n"
            "  batch_size: 4\n"
            "  sequence_length: 2048\n"
            "  sync: {method: diloco, inner_steps: 500}\n"
            "  command: [train.py, --epochs=1]\n"
        )
        assert spec.training is not None
        assert spec.training.model.parameters == 10**9
        assert spec.training.tokens == 8192
        assert spec.training.sync.inner_steps == 500
        assert spec.name == "train"

    def test_training_problems_name_their_fields(self) -> None:
        found = problems(
            "kind: training\n"
            "training:\n"
            "  world_size: 0\n"
            "  model: {parameters: 1.5}\n"
            "  command: [train.py]\n"
            "  sync: {method: ddp, inner_steps: 10}\n"
        )
        assert "training.world_size" in found
        assert "training.model.parameters" in found
        assert any("inner_steps belongs to diloco" in m for m in found.values())

    def test_a_service_job_parses(self) -> None:
        spec = parse_job("kind: service\nservice:\n  command: [serve.py]\n  restarts: 3\n")
        assert spec.service is not None
        assert spec.service.restarts == 3

    def test_non_finite_numbers(self) -> None:
        found = problems(sweep_file("  a: {min: 0.0, max: .inf}\n"))
        assert "finite" in found["parameters.a.max"]

    def test_deep_nesting_is_refused(self) -> None:
        deep = "[" * 40 + "]" * 40
        found = problems(sweep_file(f"  a: {{value: {deep}}}\n"))
        assert "nests deeper" in next(iter(found.values()))
        assert "nests too deeply" in problems("a: " + "[" * 5000 + "]" * 5000)["(file)"]

    def test_bad_parameter_names(self) -> None:
        found = problems(sweep_file("  '1st': {values: [1]}\n  'has space': {values: [1]}\n"))
        assert set(found) == {"parameters.1st", "parameters.has space"}


class TestUnits:
    @pytest.mark.parametrize(
        ("text", "micro"),
        [
            (2.5, 2_500_000),
            (3, 3_000_000),
            ("2.5 credits/device-hour", 2_500_000),
            ("2.5 credits per device-hour", 2_500_000),
            ("0.000001 cr/h", 1),
            ("10", 10_000_000),
            (0, 0),
        ],
    )
    def test_prices(self, text: object, micro: int) -> None:
        assert parse_credits(text, rate=True) == micro

    @pytest.mark.parametrize("text", ["1.0000001", -1, "free", True, "2 credits/hour extra"])
    def test_bad_prices(self, text: object) -> None:
        with pytest.raises(ValueError):  # noqa: PT011 - the message is checked in TestProblems
            parse_credits(text, rate=True)

    @pytest.mark.parametrize(
        ("text", "ms"),
        [
            (600, 600_000),
            (1.5, 1_500),
            ("10m", 600_000),
            ("1h30m", 5_400_000),
            ("90s", 90_000),
            ("500ms", 500),
            ("2 min", 120_000),
            ("1d", 86_400_000),
            ("0.0001", 1),  # rounded up to a whole millisecond, never to zero
        ],
    )
    def test_durations(self, text: object, ms: int) -> None:
        assert parse_duration_ms(text) == ms

    @pytest.mark.parametrize("text", ["0", -3, "10 minutes", "m10", "1h 30", False])
    def test_bad_durations(self, text: object) -> None:
        with pytest.raises(ValueError):  # noqa: PT011
            parse_duration_ms(text)

    @pytest.mark.parametrize(
        ("text", "size"),
        [
            (1024, 1024),
            ("16GB", 16 * 10**9),
            ("16 GiB", 16 * 2**30),
            ("512MiB", 512 * 2**20),
            ("1.5kB", 1500),
            ("10MB", 10**7),
        ],
    )
    def test_sizes(self, text: object, size: int) -> None:
        assert parse_size(text) == size

    @pytest.mark.parametrize("text", ["1.5B", "16 XB", -1, 1.5])
    def test_bad_sizes(self, text: object) -> None:
        with pytest.raises(ValueError):  # noqa: PT011
            parse_size(text)


class TestSpecHash:
    def test_is_hex_sha256_and_stable_across_formatting(self) -> None:
        block = parse_job(FULL)
        flow = parse_job(
            "{name: digits-svm, sweep: {program: train.py, method: bayes, "
            "metric: {goal: minimize, name: val_loss}, run_cap: 24, "
            "early_terminate: {type: hyperband, eta: 3, min_iter: 3}, "
            "parameters: {gamma: {value: scale}, kernel: {values: [rbf, linear]}, "
            "C: {max: 100, min: 0.001, distribution: log_uniform_values}}}, "
            "resources: {accelerator: H100-SXM, devices_per_trial: 2, min_memory: 16000000000}, "
            "budget: {max_price: 2.5, max_spend: 10}, "
            "limits: {trial_timeout: 600, max_output: 10000000, retries: 3, network: true}}"
        )
        assert spec_hash(block) == spec_hash(flow)
        assert len(spec_hash(block)) == 64
        int(spec_hash(block), 16)

    def test_changes_with_anything_that_changes_the_work(self) -> None:
        base = spec_hash(parse_job(FULL))
        assert spec_hash(parse_job(FULL.replace("max: 100", "max: 10"))) != base
        assert spec_hash(parse_job(FULL.replace("retries: 3", "retries: 4"))) != base
        assert spec_hash(parse_job(FULL.replace('"10 credits"', '"11 credits"'))) != base


def _spec(command: str) -> JobSpec:
    return parse_job(sweep_file("  a: {values: [1]}\n", extra=command))


PARAMS = {"lr": 0.001, "kernel": "rbf", "shrink": True, "layers": [16, 32]}


class TestRenderCommand:
    def test_default_command_is_wandbs(self) -> None:
        spec = parse_job(sweep_file("  a: {values: [1]}\n"))
        argv = render_command(spec, PARAMS, interpreter="/opt/py/bin/python3")
        assert argv == [
            "/usr/bin/env",
            "/opt/py/bin/python3",
            "train.py",
            "--kernel=rbf",
            "--layers=[16, 32]",
            "--lr=0.001",
            "--shrink=True",
        ]

    def test_every_macro(self) -> None:
        spec = _spec(
            "command:\n  - ${interpreter}\n  - -u\n  - ${program}\n  - ${args_no_hyphens}\n"
            "  - --\n  - ${args_no_equals}\n  - ${args_no_boolean_flags}\n  - ${args_json}\n"
        )
        params = {"lr": 0.5, "fast": True, "slow": False}
        argv = render_command(spec, params, interpreter="python")
        assert argv == [
            "python",
            "-u",
            "train.py",
            "fast=True",
            "lr=0.5",
            "slow=False",
            "--",
            "--fast",
            "True",
            "--lr",
            "0.5",
            "--slow",
            "False",
            "--fast",
            "--lr=0.5",
            '{"fast": true, "lr": 0.5, "slow": false}',
        ]

    def test_args_json_file_is_the_path_given(self) -> None:
        spec = _spec(
            "command:\n  - ${env}\n  - ${interpreter}\n  - ${program}\n  - ${args_json_file}\n"
        )
        assert uses_args_json_file(spec)
        argv = render_command(spec, {"a": 1}, "python", args_json_file="/work/t7/args.json")
        assert argv[-1] == "/work/t7/args.json"
        assert json.loads(args_json({"a": 1, "b": [1, 2]})) == {"a": 1, "b": [1, 2]}
        with pytest.raises(ValueError, match="args_json_file"):
            render_command(spec, {"a": 1}, "python")
        assert not uses_args_json_file(parse_job(WANDB_SWEEP))

    def test_nested_parameters_render_as_wandb_does(self) -> None:
        spec = parse_job(sweep_file("  a: {values: [1]}\n"))
        argv = render_command(spec, {"opt": {"lr": 0.1}}, "python")
        assert argv[-1] == "--opt={'lr': 0.1}"


class TestServiceEndpointSection:
    """What a service serves: its socket, health path, replicas (issue 20)."""

    def test_defaults_make_a_reachable_service(self) -> None:
        spec = parse_job("kind: service\nservice:\n  command: [serve.py]\n")
        assert spec.service is not None
        assert spec.service.listen.socket == "service.sock"
        assert spec.service.health == "/healthz"
        assert spec.service.replicas == 1

    def test_declared_endpoint(self) -> None:
        spec = parse_job(
            "kind: service\nservice:\n  command: [serve.py]\n  listen: {socket: api.sock}\n"
            "  health: /ready\n  replicas: 3\n  ready_timeout: 30s\n"
        )
        assert spec.service is not None
        s = spec.service
        assert (s.listen.socket, s.health, s.replicas, s.ready_timeout_ms) == (
            "api.sock",
            "/ready",
            3,
            30_000,
        )

    def test_a_port_is_refused_with_the_reason(self) -> None:
        found = problems("kind: service\nservice:\n  command: [s.py]\n  listen: {port: 8000}\n")
        assert "no network" in found["service.listen.port"]

    @pytest.mark.parametrize("name", ["../x", "/tmp/s.sock", "a/b", "..", "", "x" * 65])
    def test_a_socket_outside_the_work_dir_is_refused(self, name: str) -> None:
        found = problems(
            f"kind: service\nservice:\n  command: [s.py]\n  listen: {{socket: '{name}'}}\n"
        )
        assert "work directory" in found["service.listen.socket"]

    def test_bad_health_and_replicas(self) -> None:
        found = problems(
            "kind: service\nservice:\n  command: [s.py]\n  health: healthz\n  replicas: 0\n"
        )
        assert "absolute URL path" in found["service.health"]
        assert "service.replicas" in found
