"""The typed configuration model: every section, every key, every default.

This module is the only place a default is written, each with its comment. The packaged
``piarec/defaults/local.yaml`` holds only what the embedded local stack sets differently
(see :mod:`piarec.config.loader` for how files and the environment are layered on top).
Closed vocabularies are ``Literal`` types, so a value outside them fails at load with the
allowed values in the message.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

# The validation metrics the promotion gate can compare: the names
# piarec.evaluate.metrics.summarize returns (tests/test_config.py checks they agree).
GateMetric = Literal["ndcg_at_100", "recall_at_20", "recall_at_50"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    # Root for everything the pipeline writes: a local folder or s3://bucket/prefix.
    root: str = "piarec-work"
    # Where raw events live; defaults to <root>/events.
    events: str | None = None
    # Where the daily recommendations are committed; defaults to <root>/recommendations.
    # Written task-side with pyarrow, so an s3:// root here needs no s3a on the cluster.
    recommendations: str | None = None
    # A partition's earlier versions stay readable this long after a newer commit (for
    # readers that read the old pointer just before it), then the next run of it deletes them.
    retain_versions_s: float = Field(3600.0, ge=0)
    # An S3 partition's lease outlives its holder's last renewal by this much: a run killed on
    # another host blocks the partition this long (on the same host, or locally, not at all).
    lease_ttl_s: float = Field(120.0, gt=0)


class EventsSchema(_Section):
    # Column names in the events dataset (mapping for sources that name them differently).
    user_col: str = "user_id"
    item_col: str = "item_id"
    type_col: str = "event_type"
    ts_col: str = "ts"
    watch_col: str = "watch_seconds"
    # Optional, for A/B analysis only (docs/ab-logging.md): the card / row an event happened
    # on, and the 0-based position of the title in it. Builds and scoring never read them.
    surface_col: str = "surface"
    slot_col: str = "slot"
    # The file upstream writes into a dt=D partition once day D is complete: the DAGs'
    # sensors wait for it, not for the folder (which exists while the day is still written).
    done_marker: str = Field("_SUCCESS", pattern=r"^[A-Za-z0-9_.-]+$")


class PositiveRule(_Section):
    # An event is a positive when its type is listed here...
    event_types: list[str] = Field(default_factory=lambda: ["play", "complete"])
    # ...and it was watched at least this long (seconds). 0 disables the check.
    min_watch_seconds: int = Field(60, ge=0)


class FilterConfig(_Section):
    # Training-only filters; they never remove a user from daily scoring.
    min_user_positives: int = Field(5, ge=1)  # as in the method's preprocessing
    min_item_users: int = Field(1, ge=1)
    # Users with more positives than this are dropped as bots / shared accounts.
    max_user_positives: int | None = Field(None, ge=1)


class QualityConfig(_Section):
    # Tolerable dirt in the events read (null or empty ids, a null ts, a ts outside the window
    # inside an in-window dt partition, an event type not listed below) is dropped and counted
    # in the manifest; above this share of the events read the job fails (InputDataError).
    max_dirty_fraction: float = Field(0.01, ge=0.0, le=1.0)
    # Event types the source may hold; any other type is dirt. null accepts every type.
    known_event_types: list[str] | None = Field(
        default_factory=lambda: ["impression", "click", "play", "complete"]
    )


class SplitConfig(_Section):
    # Held-out users are chosen by a salted hash of user_id: stable week after week.
    salt: str = "piarec-split-v1"
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    # Share of a held-out user's positives given to the model; the rest is predicted.
    fold_in_fraction: float = Field(0.8, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _fractions_leave_training_users(self) -> "SplitConfig":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("split.val_fraction + split.test_fraction must be below 0.9")
        return self


class RegularizerConfig(_Section):
    # Optional collapse regularizers added to the model's loss (Multi-VAE); all off by default.
    # Latent reconstruction (LRVAE): alpha * ||z - mu_enc(softmax(logits(z)))||^2 per user.
    latent_recon: bool = False  # switch for the latent reconstruction term
    latent_recon_weight: float = Field(1.0, ge=0.0)  # alpha_T, the weight after warm-up
    latent_recon_warmup: int = Field(10_000, ge=0)  # updates over which alpha grows linearly from 0
    # Noise-contrastive (NC-VAE): delta * KL(q(z | x_noise) || N(0, K^2 I)) for corrupted inputs.
    noise_contrastive: bool = False  # switch for the noise-contrastive term
    nc_weight: float = Field(0.1, ge=0.0)  # delta, the weight of the contrastive KL
    nc_prior_scale: float = Field(5.0, gt=0.0)  # K: standard deviation of the contrastive prior
    nc_noise: Literal["swap", "decoder"] = "swap"  # corrupt by random item swaps, or sample from the decoder
    nc_swap_fraction: float = Field(0.5, gt=0.0, le=1.0)  # swap: share of each history replaced by random items


class ModelConfig(_Section):
    # Backbone: "multivae" (Liang et al. 2018) or "recvae" (Shenbin et al. 2020).
    backbone: Literal["multivae", "recvae"] = "multivae"
    # Multi-VAE encoder: I -> hidden -> latent (Liang et al. 2018); tanh between layers.
    # "deeper" adds two latent-wide layers, "iaf" adds inverse-autoregressive flow steps
    # after the base encoder (the PIA paper's appendix D.2). RecVAE ignores it.
    encoder: Literal["shallow", "deeper", "iaf"] = "shallow"
    hidden_dim: int = Field(600, ge=1)
    latent_dim: int = Field(200, ge=1)
    # Decoder hidden layers; [] is the PIA paper's 200 -> I, [600] is Liang's 200 -> 600 -> I.
    decoder_hidden: list[int] = Field(default_factory=list)
    # Probability of keeping an input item during training (input masking).
    keep_prob: float = Field(0.5, gt=0.0, le=1.0)
    # IAF encoder: number of flow steps and the width of each step's autoregressive net.
    flow_steps: int = Field(2, ge=1)
    flow_hidden: int = Field(400, ge=1)
    # RecVAE: user-dependent KL weight beta_u = gamma * |x_u| (replaces the annealed beta),
    # encoder passes then decoder passes over the data per epoch (alternating updates),
    # and the composite prior's weights (standard normal, old posterior, wide normal).
    recvae_gamma: float = Field(0.005, gt=0.0)
    recvae_encoder_passes: int = Field(3, ge=1)
    recvae_decoder_passes: int = Field(1, ge=1)
    recvae_prior_weights: list[float] = Field(default_factory=lambda: [0.15, 0.75, 0.1])
    # Optional posterior-collapse regularizers (Multi-VAE only; all off by default).
    regularizers: RegularizerConfig = Field(default_factory=RegularizerConfig)

    @property
    def extra_encoder_layers(self) -> int:
        return {"shallow": 0, "deeper": 2, "iaf": 0}[self.encoder]

    @model_validator(mode="after")
    def _prior_weights_are_a_mixture(self) -> "ModelConfig":
        w = self.recvae_prior_weights
        if len(w) != 3 or min(w) <= 0 or abs(sum(w) - 1.0) > 1e-6:
            raise ValueError("model.recvae_prior_weights must be three positive weights summing to 1")
        reg = self.regularizers
        if self.backbone == "recvae" and (reg.latent_recon or reg.noise_contrastive):
            raise ValueError("model.regularizers (latent_recon, noise_contrastive) apply to the Multi-VAE "
                             "backbone only; switch them off for backbone 'recvae'")
        return self


class DiagnosticsConfig(_Section):
    # Posterior-collapse diagnostics on validation users (piarec/evaluate/diagnostics.py).
    enabled: bool = True  # compute them after validation evaluations
    every: int = Field(1, ge=1)  # every this many epochs
    users: int = Field(1000, ge=2)  # users sampled for active units, KL, mutual information
    posterior_samples: int = Field(32, ge=2)  # draws per user where q(z | x) has no closed form (IAF; RecVAE's KL)
    self_consistency_users: int = Field(256, ge=1)  # latents checked for encode(decode(z)) = z
    jacobian_users: int = Field(16, ge=0)  # users whose decoder Jacobian gives the IMA contrast; 0 skips it
    mask_users: int = Field(64, ge=0)  # users for mask stability (Proposition 3.2); 0 skips it
    mask_repeats: int = Field(8, ge=2)  # R: input masks drawn per user
    mask_keep_prob: float | None = Field(None, gt=0.0, le=1.0)  # masks' keep probability; null = the model's own


class PIAConfig(_Section):
    # Personalized Item Alignment regularizer (Eq. 8-10 of the PIA paper).
    enabled: bool = True  # switch for the alignment term
    lambda_a: float = Field(0.1, ge=0.0)  # starting weight; tuned on validation
    lambda_scale: float = Field(2.0, ge=1.0)  # multiplier when validation stalls
    patience: int = Field(5, ge=1)  # rho: epochs without improvement before a raise
    lambda_max: float = Field(8.0, ge=0.0)  # cap on the schedule (patience mode only)
    # "patience": raise after rho epochs without improvement, then wait rho epochs again,
    # never above lambda_max. "paper": Algorithm 1 of appendix C, read as intended: raise on
    # every epoch whose best validation epoch is rho or more epochs behind, without a cap.
    schedule: Literal["patience", "paper"] = "patience"
    # Eq. 9 "sum": the squared distance summed over the latent dimensions; "mean": averaged
    # over them (lambda_A * mean = lambda_A / latent_dim * sum). The paper's lambda_A = 8 trains well
    # only with "mean"; with "sum" it collapses the posterior (docs/benchmarks.md, section 1b).
    alignment: Literal["sum", "mean"] = "sum"


class TrainingConfig(_Section):
    batch_size: int = Field(500, ge=1)  # training users per update
    epochs: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0.0)  # Adam learning rate
    weight_decay: float = Field(0.0, ge=0.0)  # Adam weight decay
    beta_cap: float = Field(0.2, ge=0.0)  # the annealed KL weight beta stops growing here
    anneal_steps: int = Field(200_000, ge=1)  # beta = min(beta_cap, updates / anneal_steps), as Liang et al.
    # Or: beta reaches beta_cap after this many epochs, whatever the data size (replaces anneal_steps):
    # Liang et al.'s 200,000 updates suit ML-20M; a small data set makes far fewer.
    anneal_epochs: int | None = Field(None, ge=1)
    # Liang et al.'s beta procedure: a first run anneals beta towards 1 (reaching it after
    # anneal_epochs, or epochs when unset), the beta of its best validation epoch becomes
    # beta_cap, and a second run trains at that cap, annealed at the same rate (two runs' cost).
    beta_search: bool = False
    # Stop after this many epochs without validation improvement (null = run all epochs). It
    # must exceed pia.patience (rho), or lambda_A's schedule could never raise before the stop.
    early_stop_patience: int | None = Field(20, ge=1)
    seed: int = 0  # seeds initialisation, shuffling and masks
    # "auto" = the first CUDA GPU when present, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = Field(2000, ge=1)  # validation users per evaluation batch
    # Input masks and reparameterisation noise: "generator" = torch's random stream (one process),
    # "keyed" = drawn from (seed, pass, user): the same whichever process trains a user, as
    # data-parallel training needs; "auto" = keyed when several processes train, else generator.
    noise: Literal["auto", "generator", "keyed"] = "auto"
    # "bf16": the layers run under bf16 autocast (GPUs; CPUs with bf16 units), the likelihood,
    # KL and alignment in fp32; weights and optimizer state stay fp32.
    precision: Literal["fp32", "bf16"] = "fp32"


# The sections a search may tune and a tuned configuration may set (piarec tune / --tuned-config).
TUNABLE_SECTIONS = ("model", "pia", "training")


class SearchParam(_Section):
    # One searched key: a range [low, high] (log-uniform with log: true; integers when the key is
    # an integer) or a list of choices. Exactly one of the two.
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[bool | int | float | str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SearchParam":
        ranged = self.low is not None or self.high is not None
        if ranged == (self.choices is not None):
            raise ValueError("a search parameter is either a range (low, high) or a list of choices")
        if ranged and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"a range needs low < high, got low={self.low}, high={self.high}")
        if self.log and (not ranged or self.low <= 0):
            raise ValueError("log: true needs a range with low > 0")
        return self


def _default_space() -> dict[str, SearchParam]:
    r, c = (lambda lo, hi, log=False: SearchParam(low=lo, high=hi, log=log)), (lambda *v: SearchParam(choices=list(v)))
    return {
        "training.lr": r(1e-4, 1e-2, log=True),
        "model.keep_prob": r(0.3, 0.9),
        "training.beta_cap": r(0.01, 1.0, log=True),
        "training.anneal_epochs": r(1, 100, log=True),
        "model.latent_dim": c(50, 100, 200, 400),
        "model.hidden_dim": c(300, 600, 1000),
        "training.batch_size": c(128, 256, 500, 1000),
        "pia.lambda_a": r(0.01, 10.0, log=True),
        "pia.schedule": c("patience", "paper"),
        "pia.alignment": c("sum", "mean"),
        "training.epochs": c(50, 100, 200),
    }


class TuneConfig(_Section):
    # `piarec tune` (piarec/train/tune.py): an Optuna search over `space` on the snapshot's
    # validation users (the trainer's selection metric, NDCG@100 of each trial's best epoch).
    trials: int = Field(30, ge=1)  # trials to finish (complete, pruned or failed), earlier runs of the study included
    timeout_s: float | None = Field(None, gt=0)  # no new trial starts after this many seconds; null = no limit
    seed: int = 0  # seeds the TPE sampler (each trial trains with training.seed)
    startup_trials: int = Field(8, ge=1)  # trials sampled at random before TPE models the results
    # Median pruner: a trial stops when its epoch's validation NDCG@100 is below the median of the
    # earlier trials at the same epoch, after `startup_trials` trials and `prune_warmup_epochs` epochs.
    pruner: Literal["median", "none"] = "median"
    prune_warmup_epochs: int = Field(10, ge=0)
    # A trial whose training takes more than this many times as long as trial 0's (the
    # configuration as given; wall seconds of the training itself) is infeasible, like a collapsed
    # one: recorded, never chosen, and the sampler is told. null = no limit.
    max_cost_ratio: float | None = Field(None, gt=0)
    # An Optuna storage URL (sqlite:///tune.db, or a database server): a killed search resumes there
    # with its finished trials. null = in memory, one invocation.
    study_storage: str | None = None
    study_name: str | None = None  # null = "tune-<first 12 of the snapshot's manifest sha256>"
    experiment: str = "piarec-tune"  # MLflow experiment of the search run and its nested trial runs
    # Dotted keys of model / pia / training -> their range or choices.
    space: dict[str, SearchParam] = Field(default_factory=_default_space)

    @model_validator(mode="after")
    def _keys_name_tunable_fields(self) -> "TuneConfig":
        for key, spec in self.space.items():
            _check_searchable(key, space_field(key), spec)
        return self


def space_field(key: str):
    """The pydantic field a dotted ``tune.space`` key names (``training.lr``,
    ``model.regularizers.nc_weight``); ValueError naming what is wrong with the key."""
    sections = {"model": ModelConfig, "pia": PIAConfig, "training": TrainingConfig}
    parts = key.split(".")
    owner: type[BaseModel] | None = sections.get(parts[0])
    if owner is None or len(parts) < 2:
        raise ValueError(f"tune.space key {key!r} must start with one of {', '.join(TUNABLE_SECTIONS)}")
    for name in parts[1:-1]:
        field = owner.model_fields.get(name)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            raise ValueError(f"tune.space key {key!r}: {name!r} is not a section of {owner.__name__}")
        owner = field.annotation
    if parts[-1] not in owner.model_fields:
        raise ValueError(f"tune.space key {key!r}: {owner.__name__} has no field {parts[-1]!r}")
    return owner.model_fields[parts[-1]]


def integer_field(field) -> bool:
    """Whether a field takes integers and not floats (``int``, ``int | None``): its range is drawn as integers."""
    kinds = set(get_args(field.annotation)) or {field.annotation}
    return int in kinds and float not in kinds


def _check_searchable(key: str, field, spec: SearchParam) -> None:
    """Every choice, and both ends of a range, must be a valid value of the field (its type and
    bounds); a range needs a numeric field, and an integer one must hold an integer."""
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        raise ValueError(f"tune.space key {key!r} names a section, not a field")
    adapter = TypeAdapter(Annotated[ann, *field.metadata] if field.metadata else ann)
    integer = integer_field(field)
    try:
        if spec.choices is not None:
            for choice in spec.choices:
                adapter.validate_python(choice, strict=True)
            return
        if not (integer or float in (set(get_args(ann)) or {ann})):
            raise ValueError(f"tune.space key {key!r}: a range needs a numeric field; give choices")
        for end in (spec.low, spec.high):
            adapter.validate_python(int(end) if integer and float(end).is_integer() else end)
    except ValidationError as err:
        raise ValueError(f"tune.space key {key!r}: {err.errors()[0]['msg']} "
                         f"(got {spec.choices if spec.choices is not None else [spec.low, spec.high]})") from None
    if integer and math.ceil(spec.low) > math.floor(spec.high):
        raise ValueError(f"tune.space key {key!r}: the integer range [{spec.low}, {spec.high}] holds no integer")


ARM_NAME = r"^[A-Za-z0-9_-]+$"  # arm names name folders (arm=<name>)
BASELINES = ("popularity", "ease")  # the built-in arms that need no registered model


class ArmConfig(_Section):
    # One arm of a daily run: its name (letters, digits, "_" and "-"; it names the folder
    # arm=<name>), what scores its users and its share of them.
    name: str = Field(pattern=ARM_NAME)
    # A model URI (models:/piarec@champion, models:/piarec/12, runs:/..., a bundle folder) or
    # a built-in baseline fitted at scoring time on scoring.baseline_snapshot: "popularity"
    # (titles by training users) or "ease" (Steck 2019, lambda picked on validation users).
    model: str = Field(min_length=1)
    share: float = Field(gt=0.0, le=1.0)


class ScoringConfig(_Section):
    k: int = Field(100, ge=1)  # recommendations per user
    # Days of history that define active users, histories and seen titles at date D.
    history_days: int = Field(90, ge=1)
    # Event types that make a title "seen" (never recommended), positive or not.
    seen_types: list[str] = Field(default_factory=lambda: ["play", "complete"])
    batch_size: int = Field(4096, ge=1)  # users per scoring batch
    model_uri: str = "models:/piarec@champion"  # the MLflow model that scores the arm below
    # Arm names name folders (arm=<name>): letters, digits, "_" and "-" only.
    arm: str = Field("champion", pattern=ARM_NAME)
    # A/B in the same pass: when set, this model scores the users whose salted hash of
    # user_id falls in the challenger's share and writes them under arm=<challenger_arm>;
    # the others stay in arm=<arm>. The assignment depends on the salt and user_id only,
    # so a user keeps their arm from day to day (change the salt to reshuffle).
    challenger_uri: str | None = None
    challenger_arm: str = Field("challenger", pattern=ARM_NAME)
    challenger_share: float = Field(0.1, gt=0.0, le=1.0)
    # Any number of arms instead (A/B/n, with a baseline control): when set, these replace
    # model_uri / arm / challenger_*. The first arm gets the users the others leave; its share
    # must still be stated, and the shares must add up to 1. Each user is in exactly one arm.
    arms: list[ArmConfig] = Field(default_factory=list)
    ab_salt: str = "piarec-ab-v1"
    # The snapshot the baseline arms ("popularity", "ease") are fitted on; null = the one the
    # run's first model arm was trained on (its registered version's snapshot_uri tag).
    baseline_snapshot: str | None = None
    # Catalogue availability table (Parquet file or folder: item_id, available_from,
    # available_to as dates or timestamps, null = open; optional region), applied in every arm
    # (piarec/daily/availability.py). null = every title of a model's vocabulary may be served.
    availability: str | None = None
    # A title is served in day D's lists only if available throughout [D, D + this many days)
    # UTC: the scored day and the serving day after it.
    availability_days: int = Field(2, ge=1)
    # The region whose availability rows apply (with the rows of a null region); null = only
    # rows with a null region.
    region: str | None = None
    # `piarec score` engine: "spark" (the daily job) or "local" (one machine, no Spark;
    # streams a prebuilt histories dataset in and Parquet out).
    engine: Literal["spark", "local"] = "spark"
    # Local engine: "auto" = the first CUDA GPU when present, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Decoder precision. "auto" = bf16 on a GPU, fp32 on the CPU. bf16 is followed by an
    # exact correction pass, so the top-K and its scores never depend on this setting
    # beyond fp32 rounding (see piarec/scoring/scorer.py).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Local engine worker threads, each scoring whole batches (null = one per CPU core).
    threads: int | None = Field(None, ge=1)
    # Local engine: rows per output Parquet file before the next file starts.
    rows_per_file: int = Field(1_000_000, ge=1)

    @model_validator(mode="after")
    def _arms_partition_the_users(self) -> "ScoringConfig":
        if self.arms:
            check_arms(self.arms)
        return self


def check_arms(arms: list[ArmConfig]) -> None:
    """Arms split users: distinct names, shares adding up to 1 (ValueError otherwise)."""
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be distinct, got {names}")
    total = sum(a.share for a in arms)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"arm shares must add up to 1, got {' + '.join(f'{a.share:g}' for a in arms)} = {total:g}")


class MlflowConfig(_Section):
    # None = sqlite:///<storage.root>/mlflow.db (local roots only; an s3:// root needs a server).
    tracking_uri: str | None = None
    # None = <root>/mlartifacts for a local root.
    artifact_location: str | None = None
    experiment: str = "piarec"  # MLflow experiment of the training runs
    registered_model: str = "piarec"  # registered model every trained version is registered under
    # Log a validation-curve PNG per training run (needs matplotlib; skipped without it).
    log_plots: bool = True


class SparkConfig(_Section):
    # None = the cluster's: whatever spark-submit / spark-defaults.conf set (nothing is set
    # here). The packaged local default sets local[*]. Under spark-submit the launcher's
    # --master, --name and --driver-memory win and these three keys are not applied.
    master: str | None = None
    app_name: str = "piarec"
    shuffle_partitions: int = Field(8, ge=1)  # spark.sql.shuffle.partitions
    driver_memory: str = "4g"  # spark.driver.memory (when this process starts the JVM)
    # Extra Spark properties passed verbatim (keys keep their case, values are strings).
    conf: dict[str, str] = Field(default_factory=dict)


class GateConfig(_Section):
    # The promotion gate (piarec/registry/gate.py): challenger vs popularity and champion, evaluated
    # by the gate on the same validation users of the challenger's snapshot.
    # Every challenger must beat popularity on this validation metric by this relative uplift.
    metric: GateMetric = "ndcg_at_100"
    min_uplift_over_popularity: float = 0.0
    # NDCG@100 and Recall@20 may be at most this much (relative) below the champion's.
    tolerance: float = Field(0.02, ge=0.0, lt=1.0)
    # Posterior collapse: at least this many latent units must be active (posterior-mean
    # variance over validation users > 0.01, piarec/evaluate/diagnostics.py).
    min_active_units: int = Field(5, ge=0)
    # At most this share of validation users may get exactly the popularity top-K.
    max_popularity_share: float = Field(0.2, ge=0.0, le=1.0)
    # At least this share of the snapshot's titles must be in the challenger's vocabulary.
    min_vocabulary_overlap: float = Field(0.95, ge=0.0, le=1.0)


class PipelineConfig(_Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    events: EventsSchema = Field(default_factory=EventsSchema)
    window_days: int = Field(90, ge=1)  # training window: [window_end - window_days, window_end)
    positive: PositiveRule = Field(default_factory=PositiveRule)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    pia: PIAConfig = Field(default_factory=PIAConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    spark: SparkConfig = Field(default_factory=SparkConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _early_stop_outlasts_the_schedule(self) -> "PipelineConfig":
        patience, rho = self.training.early_stop_patience, self.pia.patience
        if self.pia.enabled and patience is not None and patience <= rho:
            raise ValueError(f"training.early_stop_patience ({patience}) must exceed pia.patience ({rho}): "
                             "training would stop before lambda_A's schedule could raise it")
        return self
