"""Every MLflow name ptqflow writes or reads: experiment, params, metrics, tags, artifacts, registered models.

Defined once here so the sweep, the reports, the pull command and the tests cannot drift apart.
"""

# The default model's experiment: each model file's is `<stem>-quantization` (pipelines.shared.names.experiment_name_for)
DEFAULT_EXPERIMENT = "resnet8-quantization"
# Registered names follow the model file (ptqflow.pipelines.shared.names.registered_name_for); these are the default model's.
DEFAULT_REGISTERED_MODEL = "resnet8-int8"
DEFAULT_REGISTERED_ONNX_MODEL = "resnet8-int8-onnx"


class Param:
    VARIANT = "variant"
    FRAMEWORK = "framework"
    BACKEND = "backend"
    WEIGHT_DTYPE = "weight_dtype"
    ACTIVATION_DTYPE = "activation_dtype"
    QUANT_FORMAT = "quant_format"
    PER_CHANNEL = "per_channel"
    CALIBRATION_METHOD = "calibration_method"
    # What was asked: adaround only where a grid matched the backend's weights. AdaRound is then checked against
    # nearest rounding on held-out training images (VALIDATION_SIZE of them) and WEIGHT_ROUNDING_KEPT says which
    # rounding the model file holds.
    WEIGHT_ROUNDING = "weight_rounding"
    WEIGHT_ROUNDING_KEPT = "weight_rounding_kept"  # adaround or nearest, after the held-out comparison
    # on or off, after equalization on and off were compared on the held-out images (sweep --equalization auto)
    EQUALIZATION_KEPT = "equalization_kept"
    # depthwise channels whose bias AdaRound's bias correction moved; logged when the model file holds AdaRound's
    # weights
    BIAS_CORRECTED_CHANNELS = "bias_corrected_channels"
    VALIDATION_SIZE = "validation_size"  # held-out training images outside the calibration set (0: no comparison)
    CALIBRATION_SIZE = "calibration_size"
    CALIBRATION_SEED = "calibration_seed"
    INPUT_LAYOUT = "input_layout"
    PREPROCESSING = "preprocessing"
    # What the data is and how it reaches the model (ptqflow.pipelines.data.shapes.input_params); on the parent and every variant.
    DATA_FORMAT = "data_format"  # cifar10, cifar100, imagefolder or npz
    NUM_CLASSES = "num_classes"
    INPUT_SIZE = "input_size"  # HxW the model is fed
    INPUT_CHANNELS = "input_channels"
    RESIZE = "resize"  # "none", or "bilinear from HxW" (the data's size) with --resize
    INPUT_MEAN = "input_mean"  # per channel, only when values are standardized (standardize, --mean/--std)
    INPUT_STD = "input_std"
    QCONFIG = "qconfig"
    MODEL_PATH = "model_path"
    DATA_DIR = "data_dir"
    TEST_LIMIT = "test_limit"
    VARIANTS = "variants"
    BENCH_THREADS = "bench_threads"  # the batch-256 timings' threads
    # the batch-1 threads chosen for the model file (the faster of one thread and all cores) and stored with it: the
    # MLmodel's onnxruntime session options, the version tag below; pull, serve and bench load it with them
    LATENCY_THREADS = "latency_threads"
    BENCH_ROUNDS = "bench_rounds"  # rounds a variant was timed in, alternating with FP32
    BATCHNORMS_FOLDED = "batchnorms_folded"  # BatchNormalization nodes folded into their Conv before quantization
    # Mul/Add/Sub/Div nodes of a Conv's output by per-channel constants folded into that Conv before quantization
    CHANNEL_CONSTANTS_FOLDED = "channel_constants_folded"
    MODEL_OPSET = "model_opset"  # the FP32 model's own ONNX opset
    QUANTIZATION_OPSET = "quantization_opset"  # the opset the variants quantize at (13 for a model below it)
    # On every variant run: the share of the model's MACs its recipe runs in 8-bit integers (0 for FP32; a `-mixed`
    # variant's upgraded layers and the float head are not), truncated to 4 decimals (ptqflow.models.backends.mac_share)
    INT8_MAC_SHARE = "int8_mac_share"
    MAX_ACCURACY_DROP_PP = "gate_max_accuracy_drop_pp"
    # AdaRound steps per layer; `ptqflow diagnose` reads it from a sweep run to redo the same AdaRound (cache hit)
    ADAROUND_ITERATIONS = "adaround_iterations"
    MIN_AGREEMENT = "gate_min_agreement"
    # Sensitivity-ranked fallback (ptqflow.pipelines.repair.fallback): on the sweep run the target; on a `<variant>-mixed` run
    # the variant it repairs, its upgraded layers (`layer:kind`, in the order the search added them) and the target;
    # on each search step's run the same plus the step's number and change
    TARGET_AGREEMENT = "target_agreement"
    TARGET_MAX_DROP_PP = "target_max_drop_pp"
    FALLBACK_OF = "fallback_of"
    FALLBACK_LAYERS = "fallback_layers"
    FALLBACK_TARGET = "fallback_target"
    FALLBACK_STEP = "fallback_step"
    FALLBACK_CHANGE = "fallback_change"
    # ptqflow tune (ptqflow.pipelines.tune.tuner), on its parent run: the study, where it lives (password hidden) and its limits
    TUNE_STUDY = "tune_study"
    TUNE_STORAGE = "tune_storage"
    TUNE_N_TRIALS = "tune_n_trials"
    TUNE_TIMEOUT_S = "tune_timeout_s"
    TUNE_MIN_SPEEDUP = "tune_min_speedup"
    TUNE_SEED = "tune_seed"
    TUNE_CALIBRATION_SIZES = "tune_calibration_sizes"
    TUNE_HEARTBEAT_S = "tune_heartbeat_s"
    ADAROUND_CALIBRATION_SIZE = "adaround_calibration_size"  # on a tune trial: the images AdaRound reconstructed on
    TUNE_PARAM_PREFIX = "tune."  # + search-space dimension, on each trial's run: what the sampler chose

    VARIANT_PARAMS = (
        VARIANT, FRAMEWORK, BACKEND, WEIGHT_DTYPE, ACTIVATION_DTYPE, QUANT_FORMAT, PER_CHANNEL,
        CALIBRATION_METHOD, WEIGHT_ROUNDING, CALIBRATION_SIZE, CALIBRATION_SEED, INPUT_LAYOUT, PREPROCESSING, QCONFIG,
        DATA_FORMAT, NUM_CLASSES, INPUT_SIZE, INPUT_CHANNELS, RESIZE,
    )


class Metric:
    ACCURACY = "accuracy"
    ACCURACY_DELTA_PP = "accuracy_delta_pp"
    TOP1_AGREEMENT = "top1_agreement"
    KL_DIVERGENCE = "kl_divergence_vs_fp32"
    SQNR_DB = "sqnr_db_logits"
    MODEL_SIZE_BYTES = "model_size_bytes"
    COMPRESSION_RATIO = "compression_ratio"
    TORCH_ORT_AGREEMENT = "fp32_torch_vs_ort_agreement"
    TORCH_ORT_IMAGES = "fp32_torch_vs_ort_images"  # the first N test images that agreement is measured on
    TEST_IMAGES = "test_images"
    # a fallback step's numbers are on this many held-out training images (the search's selection images)
    HELD_OUT_IMAGES = "held_out_images"
    CALIBRATION_IMAGES_USED = "calibration_images_used"  # counted by the backend as its observers ran
    # Top-1 agreement with FP32 on the held-out training images of each rounding compared (Param.VALIDATION_SIZE)
    VALIDATION_AGREEMENT_ADAROUND = "validation_agreement_adaround"
    VALIDATION_AGREEMENT_NEAREST = "validation_agreement_nearest"
    # the same for cross-layer equalization on and off, both with nearest rounding (Param.EQUALIZATION_KEPT)
    VALIDATION_AGREEMENT_EQUALIZED = "validation_agreement_equalized"
    VALIDATION_AGREEMENT_UNEQUALIZED = "validation_agreement_unequalized"
    LATENCY_MS_B1_P50 = "latency_ms_b1_p50"
    LATENCY_MS_B1_P90 = "latency_ms_b1_p90"
    THROUGHPUT_IPS_B256 = "throughput_ips_b256"
    # Speedups over FP32 onnxruntime in the same sweep, > 1 = faster, named by batch size: batch 256 from
    # throughput, batch 1 from p50 latency (FP32's over the variant's).
    SPEEDUP_VS_FP32_B256 = "speedup_vs_fp32_b256"
    SPEEDUP_VS_FP32_B1 = "speedup_vs_fp32_b1"
    # A variant is timed in rounds alternating with FP32 (ptqflow.models.runtime.latency.benchmark_against): its speedups above
    # are medians of the per-round ratios, these their lowest and highest round
    SPEEDUP_VS_FP32_B256_MIN = "speedup_vs_fp32_b256_min"
    SPEEDUP_VS_FP32_B256_MAX = "speedup_vs_fp32_b256_max"
    SPEEDUP_VS_FP32_B1_MIN = "speedup_vs_fp32_b1_min"
    SPEEDUP_VS_FP32_B1_MAX = "speedup_vs_fp32_b1_max"
    SPREAD_B1 = "spread_b1_p90_over_p50"  # of the single-image timings
    SPREAD_B256 = "spread_b256_p90_over_p50"  # of the batch-256 timings
    BENCH_CONTENDED = "bench_contended"  # 1 when a spread says the machine was busy (ptqflow.models.runtime.latency)
    # Parent-run summaries
    VARIANTS_OK = "variants_ok"
    VARIANTS_FAILED = "variants_failed"
    VARIANTS_UNSUPPORTED = "variants_unsupported"
    BEST_INT8_ACCURACY = "best_int8_accuracy"
    BEST_INT8_AGREEMENT = "best_int8_top1_agreement"
    SWEEP_SECONDS = "sweep_seconds"
    # On a variant run: the FP32 reference as timed in the same rounds (medians), which its speedups are ratios to
    FP32_THROUGHPUT_IPS_B256 = "fp32_throughput_ips_b256"
    FP32_LATENCY_MS_B1_P50 = "fp32_latency_ms_b1_p50"
    # On a tune's parent run (ptqflow.pipelines.tune.tuner)
    TUNE_TRIALS = "tune_trials"  # trials that ended (complete, pruned or failed)
    TUNE_PARETO_SIZE = "tune_pareto_size"
    TUNE_SECONDS = "tune_seconds"  # wall time of the worker that ended the study
    BEST_FEASIBLE_AGREEMENT = "best_feasible_agreement"
    BEST_FEASIBLE_SPEEDUP_B256 = "best_feasible_speedup_vs_fp32_b256"

    VARIANT_METRICS = (ACCURACY, ACCURACY_DELTA_PP, TOP1_AGREEMENT, MODEL_SIZE_BYTES, COMPRESSION_RATIO)


class Tag:
    ROLE = "ptqflow.role"  # "sweep" on the parent run, "variant" on children
    VARIANT = "ptqflow.variant"
    STATUS = "ptqflow.status"  # ok, unsupported or failed
    REASON = "ptqflow.reason"  # why a variant is unsupported or failed
    QUANTIZED_ENGINE = "ptqflow.quantized_engine"  # torch engine the accuracy was measured under
    ORT_GRAPH_SHA256 = "ptqflow.ort_graph_sha256"  # the graph onnxruntime runs after its optimizations, names aside
    SCORES_FROM = "ptqflow.scores_from"  # the variant whose evaluation gave this run's scores: the same ORT graph
    # PyTorch FX: layers whose int8 kernel departs from the reference computation of their quantization
    ENGINE_DEPARTURES = "ptqflow.engine_departures"
    ROUNDING_CHOICE = "ptqflow.rounding_choice"  # the held-out comparison of AdaRound and nearest, one sentence
    EQUALIZATION_CHOICE = "ptqflow.equalization_choice"  # the held-out comparison of equalization on and off
    KEPT_FLOAT = "ptqflow.kept_float"  # layers the backend could not quantize and left in float, each with why
    FUSION_FALLBACK = "ptqflow.fusion_fallback"  # FX: fusion patterns of the backend left out, and why
    WARNING = "ptqflow.warning"
    MODEL_SHA256 = "ptqflow.model_sha256"  # of the FP32 input model
    DATASET_DIGEST = "ptqflow.dataset_sha256"
    CALIBRATION_DIGEST = "ptqflow.calibration_indices_sha256"
    GIT_COMMIT = "ptqflow.git_commit"
    # SHA-256 over ptqflow's own .py files as run (pipelines.sweep.recording.source_digest): the code, committed or not
    SOURCE_SHA256 = "ptqflow.source_sha256"
    TORCH_THREADS = "ptqflow.torch_threads"  # torch's intra-op threads while the variants were made
    # the process's malloc setting while it ran and timed the models (ptqflow.models.runtime.allocator)
    MALLOC = "ptqflow.malloc"
    CPU_MODEL = "ptqflow.cpu_model"  # results without reduce_range depend on the CPU's int8 instructions
    CPU_INT8_ISA = "ptqflow.cpu_int8_isa"  # e.g. "avx2,avx512_vnni"; "none" when it has none of them
    PID = "ptqflow.pid"
    HOST = "ptqflow.host"
    # "<boot id>/<pid namespace>/<start time>" of the process that made the run (Linux /proc; absent elsewhere): with
    # ptqflow.pid, what no two live processes share, so a live run of another container is never taken for an orphan
    PROCESS_START = "ptqflow.process_start"
    SWEEP_RUN_ID = "ptqflow.sweep_run_id"
    VERSION_PREFIX = "ptqflow.version."  # + package name
    REGISTERED_VERSION = "ptqflow.registered_version"
    MODEL_FILE_SHA256 = "ptqflow.model_file_sha256"  # of the variant's own model file
    MODEL_FILE_IN_MODEL = "ptqflow.model_file_in_model"  # its path inside the logged MLflow model
    INPUT_KEY = "ptqflow.input_key"  # SHA-256 of everything that determines a variant's result
    DIAGNOSIS_ERROR = "ptqflow.diagnosis_error"  # why a variant has no diagnosis artifacts (the variant is fine)
    FALLBACK = "ptqflow.fallback"  # on a variant that missed the target: what the fallback search found, one line
    FALLBACK_OF = "ptqflow.fallback_of"  # on a search step's run: the variant it repairs
    # On a fallback search run (a resumed sweep's search for a variant run an earlier sweep made): that run's id
    FALLBACK_VARIANT_RUN = "ptqflow.fallback_variant_run"
    STEP_DECISION = "ptqflow.step"  # on a search step's run: added, or refused (the backend could not make it)
    REUSED_FROM = "ptqflow.reused."  # + variant, on a resumed sweep's parent: the run reused for it
    BENCH_CONTENDED = "ptqflow.bench_contended"  # why the timings are not facts, only on contended runs
    BENCH_RETIMED = "ptqflow.bench_retimed"  # when `ptqflow bench --run-id` replaced the run's timings, and how
    # Classes that had fewer training images than their share of the calibration set (ptqflow.pipelines.data.calibration)
    CALIBRATION_SHORTFALL = "ptqflow.calibration_shortfall"
    MLFLOW_PARENT = "mlflow.parentRunId"
    TUNE_STUDY = "ptqflow.tune_study"  # on a tune's parent and trial runs: the Optuna study's name
    # On a tune's parent run: "host:pid" of the worker that created the study (not ptqflow.pid: the run outlives
    # that worker, and ptqflow.tracking.recovery would take it for an orphan)
    TUNE_CREATED_BY = "ptqflow.tune_created_by"
    TUNE_TRIAL = "ptqflow.tune_trial"  # on a trial's run: its number in the study (unique within it)
    TUNE_TRIAL_ID = "ptqflow.tune_trial_id"  # the storage's id of the trial: how a worker finds a dead one's run
    TUNE_SAMPLER_SEED = "ptqflow.tune_sampler_seed"  # the seed of the worker's sampler that chose the trial
    TUNE_FEASIBLE = "ptqflow.tune_feasible"  # "yes" when the trial meets --target-agreement and --min-speedup
    # On a tune's parent run: the worker that ended it ("host:pid", the one whose claim went in) and when (UTC)
    TUNE_ENDED_BY = "ptqflow.tune_ended_by"
    # + n, on a tune's parent run: the n-th time the study was taken up again and its ended run reopened, as
    # "<UTC time> by <host:pid>"
    TUNE_REOPENED_PREFIX = "ptqflow.tune_reopened."

    STATUS_OK = "ok"
    STATUS_UNSUPPORTED = "unsupported"
    STATUS_FAILED = "failed"
    ROLE_SWEEP = "sweep"
    ROLE_VARIANT = "variant"
    ROLE_TUNE = "tune"  # a tune's parent run; its children are the trials (role variant) and each worker's fp32
    ROLE_FALLBACK_STEP = "fallback_step"  # a step of the fallback search, a child of the variant's run
    # A resumed sweep's search for a reused variant run: a child of the sweep's run; its steps are its children
    ROLE_FALLBACK_SEARCH = "fallback_search"
    STEP_ADDED = "added"  # measured; the search goes on from this config
    STEP_REFUSED = "refused"  # the backend could not make the config (the reason tag says why)
    WARNING_FP32_MISMATCH = "fp32_torch_ort_mismatch"


class ExperimentTag:
    """Experiment tags MLflow's UI reads (names and values from the MLflow 3.17 UI bundle)."""

    # MLflow's experiment kind; "custom_model_development" is its "Model training" kind (GenAI experiments use
    # "genai_development"). The 3.17 UI picks its view from the workflow switch (`?workflowType=`) instead, so the
    # links ptqflow prints carry that parameter too (see ptqflow.tracking.experiments.experiment_page).
    KIND = "mlflow.experimentKind"
    KIND_MODEL_DEVELOPMENT = "custom_model_development"
    # A saved runs-table view (the "Views" menu), opened by `?viewStateShareKey=<id>`: the UI reads no tag for the
    # default columns, so ptqflow saves its metric columns as a view.
    SAVED_VIEW_PREFIX = "mlflow.sharedViewState."
    RUNS_VIEW_ID = "ptqflow"
    RUNS_VIEW_NAME = "ptqflow: accuracy, agreement, latency, size"


class VersionTag:
    """Tags on a registered model version."""

    ACCURACY = "accuracy"
    ACCURACY_DELTA_PP = "accuracy_delta_pp"
    TOP1_AGREEMENT = "top1_agreement"
    VARIANT = "variant"
    SOURCE_RUN_ID = "source_run_id"  # no longer written: the version's run_id is its source run
    SHA256 = "sha256"
    INPUT_KEY = "input_key"  # the source run's input key: same key, same model (TorchScript bytes still differ)
    MODEL_FILE = "model_file"  # path of the model file inside the registered model's artifacts
    QUANTIZED_ENGINE = "quantized_engine"
    TEST_IMAGES = "test_images"
    DATASET_DIGEST = "dataset_sha256"
    FP32_MODEL_SHA256 = "fp32_model_sha256"  # the FP32 model the version was quantized from and compared with
    INPUT_LAYOUT = "input_layout"
    PREPROCESSING = "preprocessing"
    INPUT_BATCH = "input_batch"  # only for a model whose batch dimension is fixed (at 1)
    # How `pull --evaluate` rebuilds the inputs (ptqflow.pipelines.data.shapes.input_version_tags); absent on older versions
    DATA_FORMAT = "data_format"
    INPUT_SIZE = "input_size"  # HxW
    RESIZE = "resize"  # none, or bilinear from HxW
    INPUT_MEAN = "input_mean"  # only when values are standardized
    INPUT_STD = "input_std"
    LATENCY_MS_B1 = "latency_ms_b1_p50"
    SPEEDUP_B1 = "speedup_vs_fp32_b1"  # FP32's batch-1 latency over the version's, timed in alternating rounds
    SPEEDUP_B1_MAX = "speedup_vs_fp32_b1_max"  # its largest over the rounds: below 1, every round found it slower
    # What the latency was measured on: the gate breaks a tie on latency only between versions timed alike
    LATENCY_CONTENDED = "latency_contended"  # "yes" when the machine was busy while timing (bench_contended), else "no"
    CPU_MODEL = "cpu_model"
    CPU_INT8_ISA = "cpu_int8_isa"
    BENCH_THREADS = "bench_threads"
    LATENCY_THREADS = "latency_threads"  # the source run's param: the batch-1 threads pull, serve and bench use
    INT8_MAC_SHARE = "int8_mac_share"  # the source run's param: 1 minus what runs in FP32 or 16 bits
    PROMOTION_DECISION = "promotion_decision"  # promoted, rejected or manual
    PROMOTION_REASON = "promotion_reason"  # no longer written: the reason is the description's first sentence
    PROMOTION_POLICY = "promotion_policy"  # no longer written: the policy is in the version's description


class Artifact:
    MODEL_FILE_DIR = "model_file"
    QCONFIG = "qconfig.json"
    PER_CLASS_ACCURACY = "per_class_accuracy.json"
    COMPARISON_MD = "comparison.md"
    COMPARISON_CSV = "comparison.csv"
    CALIBRATION_INDICES = "calibration_indices.json"
    COMPARISON_HTML = "comparison.html"
    CONFUSION_MATRIX = "confusion_matrix.png"
    PLOT_ACCURACY_VS_SIZE = "plots/accuracy_vs_size.png"
    PLOT_ACCURACY_VS_LATENCY = "plots/accuracy_vs_latency.png"
    PLOT_PER_CLASS = "plots/per_class_accuracy.png"
    PLOT_AGREEMENT = "plots/top1_agreement.png"
    # Per-layer diagnosis (ptqflow.models.diagnosis): on a variant run, its table and plot; on a sweep run, the variants
    # compared layer by layer.
    DIAGNOSIS_CSV = "diagnosis/layers.csv"
    DIAGNOSIS_JSON = "diagnosis/layers.json"
    DIAGNOSIS_PLOT = "diagnosis/layer_sqnr.png"
    DIAGNOSIS_BACKENDS_PLOT = "diagnosis/backends.png"
    # On a variant run that missed the target: the fallback search (candidates, ranking, steps, outcome)
    FALLBACK_SEARCH = "fallback/search.json"
    # On a tune's parent run: the declared search space, every trial, the Pareto front (table and plot)
    TUNE_SPACE = "tune/space.json"
    TUNE_TRIALS_CSV = "tune/trials.csv"
    TUNE_PARETO_MD = "tune/pareto.md"
    TUNE_PARETO_CSV = "tune/pareto.csv"
    TUNE_PARETO_PLOT = "tune/pareto.png"
    # Before MLflow logged models: the run artifact dir that held each variant's MLflow model (`runs:/<run>/model`);
    # still registered from when a resumed sweep reuses such a run. Variants now log a logged model named after
    # themselves (ptqflow.tracking.logged_models.log_torchscript_model / log_onnx_model).
    LOGGED_MODEL_NAME = "model"
    DATASET_CONTEXT_TEST = "test"
    DATASET_CONTEXT_TRAIN = "train"  # on the sweep's parent run: the images calibration draws from
