"""Every config and option type, in pydantic only: importing this module loads no torch.

`TrainConfig` (one training run), each strategy kind's options (`STRATEGY_OPTIONS`: what a kind
reads, which training methods it runs with, whether it reads earlier tasks' data) and each merge
method's parameters (`MERGE_METHODS`). The strategies and the merge math live above, in
`cairn.strategies` and `cairn.methods`; their tables name the same kinds and methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, ValidationInfo, model_validator

from cairn.errors import ConfigError
from cairn.validation import Strict, given

DEFAULT_BASE = "bundled:smollm2-135m"
TRAIN_METHODS = ("lora", "fft")  # TrainConfig.method's values

DEFAULT_LR = {"lora": 1e-3, "fft": 2e-5}


class TrainConfig(Strict):
    """Hyper-parameters of one training run; unknown keys are errors."""

    # Each description is also the `cairn train` flag's help; `shown_default` where the default is computed.
    method: Literal[TRAIN_METHODS] = Field("lora", description="lora: a LoRA adapter; fft: all weights (a full model folder)")  # type: ignore[valid-type]
    epochs: int = Field(8, ge=1, description="passes over the training examples")
    lr: float | None = Field(None, gt=0, description="peak learning rate", json_schema_extra={"shown_default": "1e-3 for LoRA, 2e-5 for FFT"})
    batch_size: int = Field(16, ge=1, description="examples per step (per process)")
    grad_accum: int = Field(1, ge=1, description="steps whose gradients are summed before each optimizer update")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="fraction of the updates over which the learning rate rises from 0")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="the learning rate's decay after warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient's norm to this (null in a config: no clipping)")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scale numerator (the update is scaled by alpha / r)", json_schema_extra={"shown_default": "2 x lora_r"})
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch's input")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="module names LoRA adapts, or all-linear (every linear layer but the output head)")
    max_length: int = Field(1024, ge=8, description="tokens per example; longer ones are cut")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds data order, initialisation and dropout")  # numpy's seed range
    bf16: bool | Literal["auto"] = Field("auto", description="train under bfloat16 autocast (auto: where the device computes bf16 natively)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


class StrategyOptions(Strict):
    """A strategy kind's options, and what the kind declares it can run: an experiment config is
    checked against them when it is read, before any model is loaded."""

    methods: ClassVar[tuple[str, ...]] = TRAIN_METHODS  # the training methods (TrainConfig.method) it trains with
    # It trains with a loss term or a gradient projection over whole weight matrices, which FSDP2
    # splits between processes: refused under an FSDP2 launch (cairn.experiment).
    whole_weights: ClassVar[bool] = False

    def reads_history(self) -> bool:
        """True when the kind trains on earlier tasks' data (fully-collaborative only): it then
        gets `(task, earlier_tasks)` pairs."""
        return False

    def fits(self, cfg: TrainConfig) -> None:
        """Raise ConfigError where these options do not go with the training config `cfg`."""

    def most_tasks(self) -> int | None:
        """The longest stream the kind can run with these options (None: any)."""
        return None

    def check(self, cfg: TrainConfig) -> None:
        """Raise ValueError (its message follows "strategy NAME (kind KIND) ") where this kind
        cannot run these options with the training config `cfg`."""
        if cfg.method not in self.methods:
            raise ValueError(f"trains with method {' or '.join(self.methods)} only, got train method {cfg.method!r}; set train: {{method: {self.methods[0]}}}")
        try:
            self.fits(cfg)
        except ConfigError as exc:
            raise ValueError(f"with train method {cfg.method}: {exc}") from None

class SequentialOptions(StrategyOptions):
    continue_adapter: bool = False


class ReplayOptions(StrategyOptions):
    rate: float = Field(0.1, ge=0, le=10, description="examples replayed from each earlier task, as a fraction of the current task (0: sequential training, the control)")
    general: str | None = Field(None, description="a task source replayed at every stage as general data, beside the earlier tasks (TRACE replays Lima); only its train split is read")
    general_rate: float = Field(0.1, ge=0, le=10, description="examples replayed from `general` at each stage, as a fraction of the current task")
    general_chat_template: bool = Field(False, description="wrap the general data's prompts in the model's chat template (required where the experiment's chat_template is on)")

    @model_validator(mode="after")
    def _general_keys_need_general(self, info: ValidationInfo):
        unused = [k for k in given(self, info) if k in ("general_rate", "general_chat_template")]
        if unused and self.general is None:
            raise ValueError(f"{', '.join(unused)} applies only with general: SOURCE, the task source replayed as general data; set general or drop {', '.join(unused)}")
        return self

    def reads_history(self) -> bool:
        return True


class JointOptions(StrategyOptions):
    mix: Literal["balanced", "natural"] = "balanced"

    def reads_history(self) -> bool:
        return True


class OLoRAOptions(StrategyOptions):
    methods: ClassVar[tuple[str, ...]] = ("lora",)
    whole_weights: ClassVar[bool] = True

    lambda1: float = Field(0.1, ge=0, description="weight of the orthogonality term: the mean over modules of mean|A_new A_prevᵀ| (raw: the sum of sums)")
    raw: bool = Field(False, description="the study's unnormalised orthogonality term, Σ_modules sum|A_new A_prevᵀ|, whose scale grows with the model")
    lambda2: float = Field(0.0, ge=0, description="weight of the L2 norm of the new adapter's parameters")


class L2Options(StrategyOptions):
    """L2-SP (methods/l2.py): sequential training with λ · Σ‖θ − θ_base‖² over the trained weights."""

    whole_weights: ClassVar[bool] = True

    model_config = ConfigDict(populate_by_name=True)

    lambda_: float = Field(0.1, ge=0, alias="lambda", description="weight of Σ‖θ − θ_base‖² (LoRA: Σ_modules ‖scale·B·A‖², the adapter being the whole delta); each stage records its ratio to the task loss")


class EWCOptions(StrategyOptions):
    """EWC (methods/ewc.py): sequential training with λ · Σ_j F_j (θ − θ*_j)², F_j the Fisher each
    earlier contributor ships with its contribution (semi-collaborative: no earlier data is read)."""

    whole_weights: ClassVar[bool] = True

    model_config = ConfigDict(populate_by_name=True)

    lambda_: float = Field(100.0, ge=0, alias="lambda", description="weight of the elastic penalty Σ_j F_j (θ − θ*_j)² (no ½, as TRACE and EasyCL); each stage records its ratio to the task loss")
    fisher_batch_size: int = Field(1, ge=1, description="examples per squared gradient of the Fisher estimate (1: per example)")


class MagMaxOptions(StrategyOptions):
    """MagMax (methods/magmax.py): sequential fine-tuning; stage s is the base plus λ times, per entry, the largest-magnitude task-vector entry of stages 1..s."""

    model_config = ConfigDict(populate_by_name=True)

    lambda_: float = Field(1.0, gt=0, alias="lambda", description="scale of the selected task vector added to the base (FusionBench's scaling_factor)")


class LwFOptions(StrategyOptions):
    """LwF (methods/lwf.py): sequential training + λ · KL(previous model ‖ current) at temperature T on the current task's batches."""

    whole_weights: ClassVar[bool] = True

    model_config = ConfigDict(populate_by_name=True)

    lambda_: float = Field(1.0, ge=0, alias="lambda", description="weight of the distillation term (LwF's λ_o); each stage records its ratio to the task loss")
    temperature: float = Field(2.0, gt=0, description="softmax temperature of both distributions (LwF's and TRACE's 2)")


class OPCMOptions(StrategyOptions):
    """OPCM (methods/opcm.py): per-task contributions from the base, merged continually by orthogonal projection."""

    alpha: float = Field(0.5, ge=0, lt=1, description="share of the merge's singular values whose directions (the top-left block) a new task vector is projected out of, besides every (u_i, v_i) pair; FusionBench's default 0.5")


class OSFOptions(StrategyOptions):
    """PEFT's OSF in its sequential recipe (strategies/osf.py): stage s keeps the top `effective_rank` + (s − 1)·`rank_step` (at most `max_rank`) share of each weight's singular directions frozen."""

    methods: ClassVar[tuple[str, ...]] = ("fft",)
    whole_weights: ClassVar[bool] = True

    effective_rank: float = Field(0.3, gt=0, lt=1, description="share of each targeted weight's singular directions frozen at stage 1 (PEFT's effective_rank as a fraction)")
    rank_step: float = Field(0.2, ge=0, lt=1, description="added to the frozen share at each later stage")
    max_rank: float = Field(0.9, gt=0, lt=1, description="the largest frozen share (some directions must stay trainable)")


@dataclass(frozen=True)
class MergeParameters:
    reads: frozenset[str]  # which of MERGE_PARAMETERS (but normalize) the method reads
    normalize: bool | None  # mergekit's default; None: the method has no normalize
    inputs: int | None = None  # the most inputs (contributions) it merges, as mergekit's; None: any number


# Each merge method's parameters; its math is the function of the same name in methods/merge/methods.py.
MERGE_METHODS: dict[str, MergeParameters] = {
    "average": MergeParameters(frozenset(), True),
    "task_arithmetic": MergeParameters(frozenset({"lambda"}), False),
    "ties": MergeParameters(frozenset({"density", "lambda"}), True),
    "dare_linear": MergeParameters(frozenset({"density", "lambda", "seed"}), False),
    "dare_ties": MergeParameters(frozenset({"density", "lambda", "seed"}), False),
    "breadcrumbs": MergeParameters(frozenset({"density", "gamma", "lambda"}), False),
    "breadcrumbs_ties": MergeParameters(frozenset({"density", "gamma", "lambda"}), False),
    "model_stock": MergeParameters(frozenset({"filter_wise"}), None),
    "slerp": MergeParameters(frozenset({"t"}), None, inputs=1),
    "della": MergeParameters(frozenset({"density", "epsilon", "lambda", "seed"}), True),
    "della_linear": MergeParameters(frozenset({"density", "epsilon", "lambda", "seed"}), False),
    "sce": MergeParameters(frozenset({"select_topk"}), None),
    "karcher": MergeParameters(frozenset({"max_iter", "tol"}), None),
    "nuslerp": MergeParameters(frozenset({"nuslerp_row_wise", "nuslerp_flatten"}), None, inputs=2),
}
MERGE_PARAMETERS = ("density", "gamma", "epsilon", "lambda", "seed", "t", "filter_wise", "select_topk", "max_iter", "tol", "nuslerp_row_wise",
                    "nuslerp_flatten", "normalize")  # what a method may or may not read; fmt: skip

# `combine: factors`: each method that merges LoRA factors, and the PEFT `add_weighted_adapter`
# combination_type it is (methods/merge/factors.py).
FACTOR_METHODS = {"task_arithmetic": "linear", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties"}


class MergeOptions(StrategyOptions):
    """A merge's method and parameters (`lambda` in YAML and on the command line)."""

    model_config = ConfigDict(populate_by_name=True)

    method: Literal[tuple(MERGE_METHODS)] = "ties"  # type: ignore[valid-type]
    density: float = Field(1.0, gt=0, le=1, description="fraction of each task vector kept (ties, dare_*, breadcrumbs*; della*: the mean keep probability)")
    gamma: float = Field(0.01, ge=0, le=1, description="breadcrumbs*: fraction of each task vector's largest-magnitude entries dropped (mergekit's default 0.01)")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    normalize: bool | None = Field(None, description="divide by the summed weights; default: the method's (mergekit's)")
    seed: int = Field(0, description="seed of the random drops of dare_* and della*")
    t: float | None = Field(None, allow_inf_nan=False, description="slerp (required): the interpolation from the base (0) to the input (1)")
    filter_wise: bool = Field(False, description="model_stock: one interpolation ratio per output row instead of one per tensor")
    epsilon: float = Field(0.15, gt=0, lt=1, description="della*: keep probabilities run from density - epsilon (smallest |τ| in a row) to density + epsilon (largest); mergekit's default 0.15")
    select_topk: float = Field(1.0, gt=0, le=1, description="sce: fraction of the entries whose task vectors vary most across the inputs that are kept (mergekit's default 1: all)")
    max_iter: int = Field(10, ge=0, description="karcher: most iterations of the Riemannian mean (mergekit's default 10)")
    tol: float = Field(1e-5, ge=0, allow_inf_nan=False, description="karcher: stop when the tangent step is shorter; also the smallest norm and angle counted (mergekit's default 1e-5)")
    nuslerp_row_wise: bool = Field(False, description="nuslerp: interpolate each column (as mergekit's flag, which transposes) instead of each row, where nuslerp_flatten is off")
    nuslerp_flatten: bool = Field(True, description="nuslerp: interpolate the whole tensor flattened (mergekit's default); off: row by row")
    combine: Literal["delta", "factors"] = Field("delta", description="delta: merge each module's exact ΔW = B·A; factors (LoRA only): merge the A matrices among themselves and the B among themselves, as PEFT's add_weighted_adapter")

    @model_validator(mode="after")
    def _applies(self, info: ValidationInfo):
        """A parameter the method does not read is an error, not silently unused (set ones only:
        the defaults are every method's)."""
        if self.combine == "factors" and self.method not in FACTOR_METHODS:
            raise ValueError(f"method {self.method} does not combine factors; combine: factors supports {', '.join(FACTOR_METHODS)} (or use combine: delta)")
        spec = MERGE_METHODS[self.method]
        uses = spec.reads | ({"normalize"} if self.combine == "delta" and spec.normalize is not None else set())
        unused = [k for k in given(self, info) if k in MERGE_PARAMETERS and k not in uses]
        if unused:
            what = self.method if self.combine == "delta" else f"{self.method} with combine: factors"
            raise ValueError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to {what}; it reads: {', '.join(sorted(uses)) or 'no parameters'}")
        if self.method == "slerp" and self.t is None and not (info.context or {}).get("saved"):
            raise ValueError("slerp needs t, its interpolation from the base at 0 to the input at 1, as in mergekit")
        if self.method.startswith("della") and self.density < 1 and not 0 < self.density - self.epsilon < self.density + self.epsilon < 1:
            raise ValueError(f"{self.method} needs density ± epsilon within (0, 1), as mergekit's; got density {self.density} and epsilon {self.epsilon}: "
                             f"give an epsilon below {min(self.density, 1 - self.density):.6g}")  # fmt: skip
        return self

    def fits(self, cfg: TrainConfig) -> None:
        if self.combine == "factors" and cfg.method != "lora":
            raise ConfigError(f"combine: factors merges LoRA factors, which {cfg.method} contributions (full fine-tunes) lack; use combine: delta, or train: {{method: lora}}")

    def most_tasks(self) -> int | None:
        """Stage s merges s contributions: a method that merges at most k inputs runs k stages."""
        return MERGE_METHODS[self.method].inputs

    def kwargs(self) -> dict:
        spec = MERGE_METHODS[self.method]
        return {"density": self.density, "gamma": self.gamma, "lambda_": self.lambda_, "t": self.t, "filter_wise": self.filter_wise,
                "epsilon": self.epsilon, "select_topk": self.select_topk, "max_iter": self.max_iter, "tol": self.tol,
                "row_wise": self.nuslerp_row_wise, "flatten": self.nuslerp_flatten,
                "normalize": spec.normalize if self.normalize is None else self.normalize}  # fmt: skip

    def keeps_the_base(self) -> bool:
        """True when inputs that all equal the base merge to the base: every task vector is 0, or
        (average) the weighted mean of equal tensors is that tensor (model_stock: ratio 0; slerp and
        nuslerp: the two ends are equal; karcher: the mean of equal points is that point)."""
        return self.method != "average" or self.kwargs()["normalize"]


ROUTERS = ("uniform", "arrow", "centroid", "trained", "random")  # the LoRA-MoE routers
MIXTRAL_ROUTERS = ("uniform", "centroid", "random")  # a Mixtral model's (full fine-tunes mixed)
MIXTRAL_SHARED = ("base", "average")  # where a Mixtral model's attention, norms and embeddings come from

# Default softmax temperatures, per mixture and router, in each router's units. LoRA-MoE's centroid
# distances (≈ 1 on an expert's own prompts) want nearly hard routing: on the quickstart's 4 packs the
# countries pack scored 0.48 at T = 0.1, 0.70 at 0.02 and 0.78 at 0.005 (its own adapter: 0.84), the
# other packs as their own adapters from 0.02 down. Arrow (PEFT's) scores the raw |x·vₖ| and takes
# PEFT's default T = 1; it failed to separate the quickstart packs (their prototypes nearly parallel:
# mean |cos| 0.74) at every temperature tried. A Mixtral gate's centroid rows are scaled to the
# centroids' spread, so T = 1 gives an expert top-2 weight ≈ 0.88 at its own centroid
# (methods/moe/routing.centroid_router).
TEMPERATURE = {"lora-moe": {"centroid": 0.005, "arrow": 1.0}, "mixtral": {"centroid": 1.0}}


class MoeOptions(StrategyOptions):
    """How contributions are mixed; the `moe` strategy's and `cairn mix`'s options."""

    router: Literal[ROUTERS] = "centroid"  # type: ignore[valid-type]
    top_k: int = Field(2, ge=1, description="experts mixed per prompt (or token)")
    temperature: float | None = Field(None, gt=0, description="softmax temperature of the router scores; default per router (TEMPERATURE)")
    threshold: float = Field(2.0, gt=0, description="centroid: the distance at which the base model ties an expert")
    granularity: Literal["sequence", "token"] = Field("sequence", description="route once per prompt or per token; arrow (PEFT's Arrow) routes per token only")
    general: str | None = Field(None, description="arrow: GenKnowSub's general adapter subtracted from every expert: 'mean' (of the experts) or a LoRA adapter folder")
    router_examples: int = Field(32, ge=1, description="trained: examples drawn from each task")
    router_epochs: int = Field(4, ge=1)
    router_lr: float = Field(1e-2, gt=0)
    balance: float = Field(0.01, ge=0, description="trained: weight of the load-balancing loss")
    seed: int = Field(0, description="trained and random: seed of the router's initial weights (trained: and of its examples); arrow: of PEFT's power iteration")

    # The routers that read each option; every other router ignores it, so setting it for one of
    # them is an error rather than a setting silently unused.
    READ_BY: ClassVar[dict[str, tuple[str, ...]]] = {
        "top_k": ("arrow", "centroid", "trained", "random"),  # uniform mixes every expert
        "temperature": ("arrow", "centroid"),  # trained and random routers' logits are used as they are
        "threshold": ("centroid",),
        "granularity": ("arrow", "centroid", "trained", "random"),  # uniform weights do not depend on the input
        "general": ("arrow",),  # GenKnowSub, as PEFT's Arrow has it
        "router_examples": ("trained",),
        "router_epochs": ("trained",),
        "router_lr": ("trained",),
        "balance": ("trained",),
        "seed": ("arrow", "trained", "random"),  # arrow: the start of PEFT's power iteration for the prototypes
    }

    @model_validator(mode="after")
    def _applies(self, info: ValidationInfo):
        """An option this router does not read is an error (set ones only: defaults never trip it)."""
        problems, by_readers = [], {}
        for k in given(self, info):
            if k == "top_k" and self.router == "uniform":
                problems.append("top_k does not apply to router uniform, which mixes every expert at weight 1/E; drop top_k or choose another router")
            elif k == "granularity" and self.router == "arrow" and self.granularity == "sequence":
                problems.append("granularity: sequence does not apply to router arrow: PEFT's Arrow routes each token; drop granularity or set it to token")
            elif self.router not in self.READ_BY.get(k, (self.router,)):
                by_readers.setdefault(self.READ_BY[k], []).append(k)
        for readers, keys in by_readers.items():
            names = ", ".join(readers[:-1]) + " and " + readers[-1] if len(readers) > 1 else readers[0]
            many = len(keys) > 1
            problems.append(f"{', '.join(keys)} {'do' if many else 'does'} not apply to router {self.router}: only the {names} "
                            f"router{'s read' if len(readers) > 1 else ' reads'} {'them' if many else 'it'}")  # fmt: skip
        if problems:
            raise ValueError("; ".join(problems))
        if self.router == "arrow":
            object.__setattr__(self, "granularity", "token")  # arrow's only granularity, not counted as set
        return self

    def check_for_mixtral(self) -> MoeOptions:
        """These options, checked for mixing full fine-tunes into a Mixtral model (`cairn mix` with
        full models; the `moe` strategy with `train: {method: fft}`): a Mixtral router is uniform,
        centroid or random, and reads neither `temperature`, `threshold` nor `granularity` (it
        routes each token), so any of them set is a ConfigError. Returns self."""
        if self.router not in MIXTRAL_ROUTERS:
            raise ConfigError(f"full fine-tunes are mixed into a Mixtral model, whose router is uniform, centroid or random; got router {self.router!r}")
        unread = [k for k in given(self) if k in ("temperature", "threshold", "granularity")]
        if unread:
            raise ConfigError(
                f"{', '.join(unread)} {'does' if len(unread) == 1 else 'do'} not apply to a Mixtral model (full fine-tunes mixed; its "
                f"{self.router} router routes every token by its own gate); drop {'it' if len(unread) == 1 else 'them'}, or mix LoRA adapters"
            )
        return self

    def reads_history(self) -> bool:
        return self.router == "trained"  # trained on a labelled mixture of the tasks

    def fits(self, cfg: TrainConfig) -> None:
        """Full fine-tunes are mixed into a Mixtral model, which has fewer routers and options."""
        if cfg.method == "fft":
            self.check_for_mixtral()

    def router_temperature(self, mixture: Literal["lora-moe", "mixtral"] = "lora-moe") -> float:
        """The softmax temperature of this router's scores: as set, else the router's default."""
        return self.temperature or TEMPERATURE[mixture].get(self.router, 1.0)



# Every strategy kind and its options; `cairn.strategies.STRATEGIES` holds their functions.
STRATEGY_OPTIONS: dict[str, type[StrategyOptions]] = {
    "sequential": SequentialOptions,
    "replay": ReplayOptions,
    "joint": JointOptions,
    "olora": OLoRAOptions,
    "merge": MergeOptions,
    "moe": MoeOptions,
    "l2": L2Options,
    "ewc": EWCOptions,
    "magmax": MagMaxOptions,
    "lwf": LwFOptions,
    "opcm": OPCMOptions,
    "osf": OSFOptions,
}
