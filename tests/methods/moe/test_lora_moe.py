"""LoRA-MoE: routing math, routers against direct formulas, saving, the CLI and the strategy."""

import json

import pytest
import torch

from cairn.cli import main
from cairn.config import parse_config
from cairn.methods.moe import statistics as centroids
from cairn.options import MoeOptions
from cairn.methods.moe.diagnostics import arrow_prototype
from cairn.methods.moe.routing import routers
from cairn.methods.moe.lora_moe import attach_experts, save_moe
from cairn.models import fingerprint
from cairn.methods.moe.router_training import train_router
from cairn.methods.moe.routing import topk_weights
from conftest import MADE_FROM, code_tasks, stored_contribution

X = torch.tensor([[1, 5, 9, 13, 17, 21]])


def test_topk_weights_is_the_softmax_of_the_top_k_and_zero_elsewhere():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0], [3.0, 3.0, 0.0, -2.0]])
    w = topk_weights(logits, 2)
    e = torch.exp(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(w[0], torch.tensor([0.0, e[0] / e.sum(), 0.0, e[1] / e.sum()]))
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    # Mixtral's order of operations (softmax over all, top-k, renormalise) gives the same weights
    p = logits.softmax(-1)
    top = p.topk(2, dim=-1)
    torch.testing.assert_close(w, torch.zeros_like(p).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True)))
    assert torch.equal(topk_weights(logits, 9), logits.softmax(-1))  # k beyond E: every expert


def test_arrow_prototype_is_the_top_right_singular_vector_of_the_delta():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 12, generator=g), torch.randn(9, 4, generator=g)
    v = arrow_prototype(a, b)
    expected = torch.linalg.svd(b @ a).Vh[0]
    torch.testing.assert_close(v.abs(), expected.abs(), atol=1e-5, rtol=1e-5)
    assert abs(float(v @ expected)) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def experts(tmp_path_factory, tiny):
    """Two LoRA adapters of tiny-random, each with routing statistics over its own prompts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cairn.models import resolve_folder

    root = tmp_path_factory.mktemp("moe")
    _, tokenizer = tiny
    prompts = [[f"The capital of Zorland number {i} is" for i in range(8)], [f"def function_{i}(x):\n    return" for i in range(8)]]
    folders, peft_models = [], []
    for k in range(2):
        torch.manual_seed(k)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_folder("tiny-random")), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        model.eval().save_pretrained(root / f"e{k}")
        modules = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A.default") for n, _ in model.named_modules() if n.endswith("lora_A.default"))
        with model.disable_adapter():  # as contributions ship them: the prompts as the base reads them
            centroids.save(centroids.input_statistics(model, tokenizer, prompts[k], modules), root / f"e{k}", len(prompts[k]))
        folders.append(root / f"e{k}")
        peft_models.append(model)
    return folders, peft_models, prompts


def base_copy():
    from cairn.models import load_model

    return load_model("tiny-random")[0]


@pytest.mark.parametrize("router", ["uniform", "arrow", "trained", "random"])
def test_one_expert_at_full_weight_equals_that_adapter(experts, router):
    folders, peft_models, _ = experts
    moe = attach_experts(base_copy(), folders[:1], MoeOptions(router=router))
    with torch.no_grad():
        torch.testing.assert_close(moe(X).logits, peft_models[0](X).logits, atol=1e-5, rtol=1e-5)


def test_uniform_mixture_is_the_mean_of_the_experts_deltas(experts):
    folders, peft_models, _ = experts
    moe = attach_experts(base_copy(), folders, MoeOptions(router="uniform"))
    layer = moe.get_submodule("model.layers.1.mlp.down_proj")
    x = torch.randn(3, layer.base.in_features)
    deltas = []
    for m in peft_models:
        lora = m.get_base_model().get_submodule("model.layers.1.mlp.down_proj")
        deltas.append(lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ ((deltas[0] + deltas[1]) / 2).T, atol=1e-5, rtol=1e-5)


def test_centroid_router_sends_each_contributors_prompts_to_its_expert_and_others_to_the_base(experts, tiny):
    folders, peft_models, prompts = experts
    _, tokenizer = tiny
    base = base_copy()
    moe = attach_experts(base_copy(), folders, MoeOptions(router="centroid", top_k=1))
    for k in range(2):
        ids = tokenizer(prompts[k][3], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, peft_models[k](ids).logits, atol=1e-4, rtol=1e-4)
    unlike = tokenizer("Once upon a time, in a small village by the sea, there lived an old fisherman.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(moe(unlike).logits, base(unlike).logits, atol=1e-5, rtol=1e-5)
    weights = [r.cached for r in routers(moe).values()]
    assert all(float(w.sum()) < 1e-3 for w in weights)  # every layer left it to the null expert
    assert routers(moe)["model.layers.0.self_attn.q_proj"].context.reports == len(weights)  # the survey heard every router


def test_batched_generation_routes_each_prompt_as_alone(experts, tiny):
    from cairn.evaluation.generation import generate

    folders, _, prompts = experts
    _, tokenizer = tiny
    moe = attach_experts(base_copy(), folders, MoeOptions(router="centroid"))
    batch = [prompts[0][1], prompts[1][2] + " x", "Hello"]
    together = generate(moe, tokenizer, batch, max_new_tokens=6)
    assert together == [generate(moe, tokenizer, [p], max_new_tokens=6)[0] for p in batch]
    # the survey pass reads the prompt without writing to the generation's KV cache
    ids = tokenizer(batch[0], return_tensors="pt")["input_ids"]
    out = moe.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.get_seq_length() == ids.shape[1] + 3


def test_likelihood_scores_a_prompt_routed_mixtures_answers_under_the_prompts_routing(experts, tiny):
    from cairn.evaluation.likelihood import candidate_logprobs

    folders, peft_models, prompts = experts
    _, tokenizer = tiny
    moe = attach_experts(base_copy(), folders, MoeOptions(router="centroid", top_k=1))
    for k in range(2):  # each contributor's prompt goes to its expert, whose answers the mixture then scores
        asked = [prompts[k][3], prompts[k][5]]
        candidates = [["Zorville", "a long answer of many words"], ["x"]]
        got, expert = candidate_logprobs(moe, tokenizer, asked, candidates), candidate_logprobs(peft_models[k], tokenizer, asked, candidates)
        assert all(abs(a - b) < 1e-4 for g, e in zip(got, expert) for a, b in zip(g, e))


def test_token_granularity_routes_every_position(experts):
    folders, _, _ = experts
    moe = attach_experts(base_copy(), folders, MoeOptions(router="random", granularity="token"))
    captured = []
    handle = next(iter(routers(moe).values())).register_forward_hook(lambda _m, _a, out: captured.append(out))
    with torch.no_grad():
        moe(X)
    handle.remove()
    assert captured[0].shape == (1, X.shape[1], 2)
    torch.testing.assert_close(captured[0].sum(-1), torch.ones(1, X.shape[1]))


def test_trained_router_learns_and_only_the_router_changes(experts, tiny):
    from cairn.data import Example, Task

    folders, _, prompts = experts
    _, tokenizer = tiny
    tasks = [Task(f"t{k}", "exact", {"train": [Example(p, f"answer{k}") for p in prompts[k]]}) for k in range(2)]
    moe = attach_experts(base_copy(), folders, MoeOptions(router="trained"))
    frozen = {k: v.clone() for k, v in moe.state_dict().items() if ".router." not in k}
    losses = train_router(moe, tokenizer, tasks, MoeOptions(router="trained", router_epochs=6, router_lr=0.05))
    assert losses[-1] < losses[0]
    after = moe.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert any(r.linear.weight.abs().sum() > 0 for r in routers(moe).values())


def test_saved_mixture_loads_through_contributions_load_with_the_same_outputs(experts, tmp_path):
    from cairn.contributions import load

    folders, _, _ = experts
    opts = MoeOptions(router="random", seed=3)
    moe = attach_experts(base_copy(), folders, opts)
    save_moe(moe, folders, opts, tmp_path / "mix", made_from={**MADE_FROM, "base_fingerprint": fingerprint(base_copy())})  # loading checks it
    loaded, _ = load(str(tmp_path / "mix"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, moe(X).logits)
    assert (tmp_path / "mix" / "experts" / "1" / centroids.FILE).is_file()


def test_cli_mix_and_its_errors(experts, tmp_path, capsys):
    folders, _, _ = experts
    out = tmp_path / "mix"
    assert main(["mix", "--base", "tiny-random", "--inputs", *map(str, folders), "--router", "arrow", "--top-k", "1", "--out", str(out)]) == 0
    assert "LoRA-MoE" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "The capital of", "--max-new-tokens", "3"]) == 0
    assert main(["mix", "--base", "tiny-random", "--inputs", str(folders[0]), "--router", "trained", "--out", str(tmp_path / "m2")]) == 4
    assert "tasks (--tasks) go with router 'trained'" in capsys.readouterr().err
    assert main(["mix", "--base", "tiny-random", "--inputs", str(folders[0]), "--router", "centroid", "--top-k", "0", "--out", str(tmp_path / "m2")]) == 4
    assert "--top-k must be at least 1" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / f).write_bytes((folders[0] / f).read_bytes())
    assert main(["mix", "--base", "tiny-random", "--inputs", str(bare), "--router", "centroid", "--out", str(tmp_path / "m3")]) == 5
    assert "centroids.safetensors not found" in capsys.readouterr().err
    assert not (tmp_path / "m3").exists()


def strategy_config(tmp_path, setting="semi", router="centroid", method="lora"):
    return parse_config({
        "name": "moe", "base": "tiny-random", "tasks": code_tasks(tmp_path), "probe": None, "setting": setting,
        "train": {"method": method, "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [{"name": "moe", "kind": "moe", "router": router}, {"name": "ties", "kind": "merge", "method": "ties", "density": 0.5}],
    })  # fmt: skip


def test_moe_strategy_reuses_the_merge_contributions_and_ships_their_statistics(tmp_path):
    from cairn.experiment import run_experiment

    results = run_experiment(strategy_config(tmp_path), tmp_path / "run", progress=False, log=lambda *_: None)
    contributions = list((tmp_path / "run" / "cache" / "contributions").iterdir())
    assert len(contributions) == 2  # one per task, shared by moe and merge
    assert all((c / centroids.FILE).is_file() for c in contributions)
    assert len(results["strategies"]["moe"]["R"]) == 3 and results["strategies"]["moe"]["summary"]["new"] is not None
    stages = [json.loads((tmp_path / "run" / "seeds" / "0" / "moe" / f"stage-{s}.json").read_text()) for s in (1, 2)]
    assert "prototypes" not in stages[0] and 0 <= stages[1]["prototypes"]["mean_abs_cos"] <= 1  # one pair of experts from stage 2


def test_a_contribution_without_statistics_gets_them_from_its_task_once(tmp_path, tiny):
    from cairn.data import Example, Task
    from cairn.workspace import Workspace
    from cairn.strategies.moe import routing_statistics
    from cairn.options import TrainConfig
    from cairn.contributions import train_contribution

    task = Task("t", "exact", {"train": [Example(f"q{i}", f"a{i}") for i in range(4)]})
    train_contribution("tiny-random", task, TrainConfig(epochs=1, batch_size=4), tmp_path / "c", progress=False)
    shipped = centroids.load(tmp_path / "c")
    (tmp_path / "c" / centroids.FILE).unlink()  # as one saved by an older Cairn
    work = Workspace(tmp_path / "cache", "tiny-random", tiny[1], progress=False)
    computed = routing_statistics(work, tiny[0], tmp_path / "c", task)
    assert computed.keys() == shipped.keys() and all(torch.allclose(computed[k], shipped[k], atol=1e-5) for k in shipped)
    assert len(list((tmp_path / "cache" / "centroids").rglob(centroids.FILE))) == 1
    again = routing_statistics(work, tiny[0], tmp_path / "c", Task("t", "exact"))  # read from the cache: no prompts needed
    assert all(torch.equal(again[k], computed[k]) for k in computed)


def test_moe_strategy_over_full_fine_tunes_exports_mixtral_models(tmp_path):
    from cairn.experiment import run_experiment

    results = run_experiment(strategy_config(tmp_path, method="fft"), tmp_path / "run", progress=False, log=lambda *_: None)
    exports = list((tmp_path / "run" / "cache" / "mixtral").iterdir())
    assert len(exports) == 2  # one per stage
    configs = sorted(json.loads((e / "config.json").read_text())["num_local_experts"] for e in exports)
    assert configs == [1, 2]
    assert len(results["strategies"]["moe"]["R"]) == 3


def test_a_trained_router_is_refused_in_the_semi_setting(tmp_path):
    from cairn.errors import ConfigError

    with pytest.raises(ConfigError, match="'moe' \\(kind moe\\) trains on earlier tasks' data"):
        strategy_config(tmp_path, router="trained")
    assert strategy_config(tmp_path, setting="full", router="trained").strategies[0].typed_options().router == "trained"


@pytest.mark.parametrize("options, message", [
    ({"router": "uniform", "top_k": 1}, "top_k does not apply to router uniform, which mixes every expert"),
    ({"router": "arrow", "threshold": 1.0}, "threshold does not apply to router arrow: only the centroid router reads it"),
    ({"router": "centroid", "router_lr": 0.1, "balance": 0.0}, "router_lr, balance do not apply to router centroid: only the trained router reads them"),
    ({"router": "arrow", "router_examples": 8}, "router_examples does not apply to router arrow: only the trained router reads it"),
    ({"router": "centroid", "router_epochs": 2}, "router_epochs does not apply to router centroid: only the trained router reads it"),
    ({"router": "uniform", "temperature": 0.5}, "temperature does not apply to router uniform: only the arrow and centroid routers read it"),
    ({"router": "trained", "temperature": 0.5}, "temperature does not apply to router trained: only the arrow and centroid routers read it"),
    ({"router": "uniform", "granularity": "token"}, "granularity does not apply to router uniform"),
    ({"router": "centroid", "seed": 1}, "seed does not apply to router centroid: only the arrow, trained and random routers read it"),
])  # fmt: skip
def test_an_option_the_router_does_not_read_is_refused_naming_the_option_and_the_router(options, message):
    from pydantic import ValidationError

    from cairn.errors import ConfigError

    with pytest.raises(ValidationError, match=message):
        MoeOptions(**options)
    with pytest.raises(ConfigError, match=f"^invalid mix option: {message}"):
        MoeOptions.parse("invalid mix option", **options)


def test_a_moe_strategy_with_an_option_its_router_does_not_read_is_refused_when_the_config_is_read(tmp_path):
    from cairn.errors import ConfigError

    config = strategy_config(tmp_path, setting="full", router="uniform").model_dump(mode="json")
    config["strategies"][0] = {"name": "moe", "kind": "moe", "router": "uniform", "top_k": 1}
    with pytest.raises(ConfigError, match=r"strategies\.0: strategy 'moe' \(moe\): top_k does not apply to router uniform"):
        parse_config(config)


@pytest.mark.parametrize("options", [
    {}, {"router": "uniform"}, {"router": "arrow", "top_k": 1, "temperature": 0.2, "granularity": "token", "general": "mean", "seed": 4},
    {"router": "centroid", "threshold": 1.5, "temperature": 0.01, "top_k": 1},
    {"router": "trained", "router_examples": 8, "router_epochs": 2, "router_lr": 0.1, "balance": 0.0, "seed": 3, "top_k": 1},
    {"router": "random", "seed": 2, "top_k": 1},
])  # fmt: skip
def test_the_options_each_router_reads_are_accepted_and_its_saved_options_read_back(options):
    from cairn.validation import SAVED

    opts = MoeOptions(**options)
    assert MoeOptions(**opts.model_dump()) == opts  # as moe.json saves and load_moe reads them, defaults included
    assert MoeOptions.model_validate(opts.model_dump(mode="json")) == opts
    assert MoeOptions.model_validate({**opts.model_dump(), "top_k": 1}, context=SAVED).top_k == 1  # SAVED: taken as written


def test_a_complete_dump_counts_only_the_values_that_differ_from_the_defaults():
    dump = MoeOptions(router="uniform").model_dump()
    with pytest.raises(ValueError, match="threshold does not apply to router uniform"):
        MoeOptions(**{**dump, "threshold": 3.0})


@pytest.mark.parametrize("options, message", [
    ({"router": "arrow"}, "whose router is uniform, centroid or random; got router 'arrow'"),
    ({"router": "trained"}, "got router 'trained'"),
    ({"router": "centroid", "threshold": 2.0}, "threshold does not apply to a Mixtral model"),
    ({"router": "centroid", "temperature": 0.01, "granularity": "token"}, "temperature, granularity do not apply to a Mixtral model"),
    ({"router": "random", "granularity": "sequence"}, "granularity does not apply to a Mixtral model"),
])  # fmt: skip
def test_mixing_full_fine_tunes_refuses_a_router_or_option_a_mixtral_model_does_not_have(options, message):
    from cairn.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        MoeOptions(**options).check_for_mixtral()
    assert err.value.exit_code == 4


def test_mixing_full_fine_tunes_takes_the_options_a_mixtral_model_reads():
    for options in ({}, {"router": "uniform"}, {"router": "centroid", "top_k": 1}, {"router": "random", "top_k": 1, "seed": 5}):
        opts = MoeOptions(**options)
        assert opts.check_for_mixtral() is opts
        assert MoeOptions(**opts.model_dump()).check_for_mixtral() == opts  # a saved set of options: its defaults were not given


@pytest.mark.parametrize("router, extra, message", [
    ("arrow", {}, "strategy 'moe' \\(kind moe\\) with train method fft: full fine-tunes are mixed into a Mixtral model, whose router is"),
    ("centroid", {"threshold": 3.0}, "strategy 'moe' \\(kind moe\\) with train method fft: threshold does not apply to a Mixtral model"),
])  # fmt: skip
def test_a_moe_strategy_over_full_fine_tunes_is_refused_when_the_config_is_read_if_a_mixtral_model_cannot_run_it(tmp_path, router, extra, message):
    from cairn.errors import ConfigError

    config = strategy_config(tmp_path, setting="full", method="fft").model_dump(mode="json")
    config["strategies"][0] = {"name": "moe", "kind": "moe", "router": router, **extra}
    with pytest.raises(ConfigError, match=message):
        parse_config(config)
    config["strategies"][0] = {"name": "moe", "kind": "moe", "router": "centroid", "top_k": 1}
    assert parse_config(config).strategies[0].typed_options().top_k == 1  # what a Mixtral model reads still parses


def test_cli_mix_takes_store_ids_and_refuses_another_base(tmp_path, capsys):
    store, other = stored_contribution(tmp_path)
    assert (tmp_path / "c" / centroids.FILE).is_file()  # every contribution ships its routing statistics
    args = ["mix", "--router", "centroid", "--inputs", "mine", "--store", str(store)]
    assert main([*args, "--base", "tiny-random", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "moe.json").is_file()
    assert main([*args, "--base", str(other), "--out", str(tmp_path / "m2")]) == 5
    assert "was made on a base with fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


def test_routing_statistics_read_each_prompt_only_up_to_max_length(tiny):
    """A huge prompt is cut as training cuts it (its last max_length tokens), not read whole."""
    model, tokenizer = tiny
    modules = ["model.layers.0.mlp", "model.layers.1.mlp"]
    long = " ".join(f"word{i}" for i in range(400))
    tail = tokenizer(long, add_special_tokens=True)["input_ids"][-16:]
    cut = centroids.input_statistics(model, tokenizer, [long], modules, max_length=16)
    expected = centroids.input_statistics(model, tokenizer, [tokenizer.decode(tail)], modules)
    whole = centroids.input_statistics(model, tokenizer, [long], modules)
    for key in cut:
        assert torch.allclose(cut[key], expected[key], atol=1e-4), key
    assert not torch.allclose(cut["model.layers.1.mlp.mean"], whole["model.layers.1.mlp.mean"], atol=1e-4)
