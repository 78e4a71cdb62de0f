#!/usr/bin/env bash
# Launch jasper-jax on a Cloud TPU VM or pod slice: create, setup, train, status, logs, fetch,
# delete. Every cloud action is one gcloud command; --dry-run prints them instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh [options] COMMAND [options] [--config.a.b=VALUE ...]

Commands:
  create    create the TPU VM (a queued resource for v5p), or reuse it if it already exists
  setup     copy the code (or clone it) to every worker and install the project there
            (alias: copy)
  train     run one stage on all workers at once; output streams back (or --detach)
  status    the TPU's state and the jasper-jax processes on every worker
  logs      follow the detached training log of worker 0
  fetch     `jasper-jax export` of a stage on worker 0, then copy the model down
  delete    delete the TPU (and its queued resource)

Settings (flag, or environment variable):
  --name NAME            JASPER_TPU_NAME     TPU name (default: jasper-tpu)
  --project ID           JASPER_PROJECT      Google Cloud project (required)
  --zone ZONE            JASPER_ZONE         e.g. us-central2-b (v4), us-east5-a (v5p) (required)
  --accelerator TYPE     JASPER_ACCELERATOR  v4-8, v4-32, v5litepod-8, v5p-64, v6e-8, ...
                                             (default: v4-8)
  --runtime VERSION      JASPER_RUNTIME      TPU software version (default per generation:
                                             tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5-lite,
                                             v2-alpha-tpuv5, v2-alpha-tpuv6e)
  --bucket gs://B[/P]    JASPER_BUCKET       workdirs go to gs://B/P/RUN/stageN (orbax writes
                                             there directly); required on multi-host slices
  --config FILE[:VARIANT] JASPER_CONFIG      a stage number or a named variant of the file,
                                             e.g. configs/jasper_paper.py:2 or :long (default:
                                             configs/embedded_default.py:1); the file itself
                                             is asked which exist ($JASPER_PYTHON or python3
                                             with the project installed reads it)
  --workdir DIR                              override the stage's workdir
  --run-name NAME                            folder under the bucket (default: config file name)
  --after VARIANT                            start from that variant's workdir instead of the
                                             one the config names, e.g. stage 4 after :pairs
  --copy-model [FIELD=]SRC                   train: first copy the model folder SRC (local, or
                                             gs://...) to ~/jasper-models/ on every worker and
                                             set --config.FIELD to that copy (FIELD defaults
                                             to model.init_hf; repeatable, e.g. also
                                             model.vision.init_hf=gs://B/siglip)
  --config.a.b=VALUE                         passed to `jasper-jax train` as is (repeatable)

Options:
  --dry-run            print every command, quoted, without running anything
  --queued / --no-queued  create through a queued resource (default: only for v5p)
  --spot               Spot TPU (training saves a checkpoint on preemption; re-run to resume)
  --internal-ip        ssh/scp over internal IPs (from a VM in the same VPC)
  --teachers           setup installs the teachers extra (torch 2.13.0 CPU wheel + bundled
                       teachers): needed by the embedded default, not by the paper recipe
  --source copy|git    setup copies this checkout (default) or clones --repo [--ref]
  --repo URL --ref REF git source for --source git
  --detach             train in the background (nohup) on every worker; follow with `logs`
  --output DIR         where fetch puts the exported model (default: exports)
  -h, --help           this text

Examples:
  launch/tpu.sh --project P --zone us-central2-b --accelerator v4-8 create
  launch/tpu.sh --project P --zone us-central2-b --accelerator v4-8 --teachers setup
  launch/tpu.sh --project P --zone us-east5-a --accelerator v5p-64 --bucket gs://my-bucket \
      --config configs/jasper_paper.py:2 train --config.data.train_dir=gs://my-bucket/data/train
  launch/tpu.sh ... --config configs/jasper_paper.py:long \
      --copy-model gs://my-bucket/models/stella_en_1.5B_v5 train --config.data.train_dir=...
EOF
}

die() {
  printf 'tpu.sh: error: %s\n' "$*" >&2
  exit 2
}

# One line a shell reads back as exactly these words: plain words as they are, others in single
# quotes (' becomes '\''). Equivalent to printf %q, easier to read for nested --command strings.
quote_words() {
  local out="" word q="'"
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$word "
    else
      out+="$q${word//$q/$q\\$q$q}$q "
    fi
  done
  printf '%s' "${out% }"
}

# Prints a command; runs it unless --dry-run. Printed lines go to stdout in a dry run (a script
# one can paste) and to stderr otherwise (so command output stays clean).
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_words "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_words "$@")" >&2
  "$@"
}

note() {
  if ((DRY_RUN)); then printf '# %s\n' "$*"; else printf 'tpu.sh: %s\n' "$*" >&2; fi
}

parse_args() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --queued) QUEUED=1 ;;
      --no-queued) QUEUED=0 ;;
      --spot) SPOT=1 ;;
      --internal-ip) INTERNAL_IP=1 ;;
      --teachers) TEACHERS=1 ;;
      --detach) DETACH=1 ;;
      --config.*=*) OVERRIDES+=("$1") ;;
      --copy-model)
        (($# >= 2)) || die "--copy-model needs a value: [FIELD=]LOCAL_DIR or [FIELD=]gs://PATH"
        COPIES+=("$2")
        shift
        ;;
      --copy-model=*) COPIES+=("${1#*=}") ;;
      --config.*) die "override '$1' needs a value: write it as --config.section.field=VALUE" ;;
      --name | --project | --zone | --accelerator | --runtime | --bucket | --config | --workdir | \
        --run-name | --after | --source | --repo | --ref | --output)
        (($# >= 2)) || die "$1 needs a value (see --help)"
        set_option "$1" "$2"
        shift
        ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      -*) die "unknown option '$1' (see --help)" ;;
      *)
        [[ -z "$COMMAND" ]] || die "one command at a time: got '$COMMAND' and '$1'"
        COMMAND="$1"
        ;;
    esac
    shift
  done
}

set_option() {
  case "$1" in
    --name) NAME="$2" ;;
    --project) PROJECT="$2" ;;
    --zone) ZONE="$2" ;;
    --accelerator) ACCELERATOR="$2" ;;
    --runtime) RUNTIME="$2" ;;
    --bucket) BUCKET="$2" ;;
    --config) CONFIG="$2" ;;
    --workdir) WORKDIR="$2" ;;
    --run-name) RUN_NAME="$2" ;;
    --after) AFTER="$2" ;;
    --source) SOURCE="$2" ;;
    --repo) REPO_URL="$2" ;;
    --ref) REF="$2" ;;
    --output) OUTPUT="$2" ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
}

# Sets GENERATION, HOSTS and the default runtime from the accelerator type; multi-host = HOSTS>1.
check_accelerator() {
  local gen size
  if [[ "$ACCELERATOR" =~ ^v5e-([0-9]+)$ ]]; then
    die "accelerator '$ACCELERATOR': gcloud calls v5e 'v5litepod', e.g. --accelerator v5litepod-${BASH_REMATCH[1]}"
  fi
  [[ "$ACCELERATOR" =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$ ]] ||
    die "unknown accelerator type '$ACCELERATOR'; use one of v2-N, v3-N, v4-N, v5p-N (N TensorCores, a multiple of 8), v5litepod-N or v6e-N (N chips: 1, 4, 8, 16, ... 256), e.g. --accelerator v4-8"
  gen="${BASH_REMATCH[1]}"
  size=$((10#${BASH_REMATCH[2]}))
  case "$gen" in
    v2 | v3 | v4 | v5p)
      # N counts TensorCores; a host holds 8 of them (4 chips x 2 cores on v4/v5p).
      ((size >= 8 && size % 8 == 0)) ||
        die "accelerator '$ACCELERATOR': $gen sizes are multiples of 8 TensorCores (e.g. $gen-8, $gen-32)"
      HOSTS=$((size / 8))
      ;;
    v5litepod | v6e)
      case "$size" in 1 | 4 | 8 | 16 | 32 | 64 | 128 | 256) ;;
        *) die "accelerator '$ACCELERATOR': $gen slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips" ;;
      esac
      # Up to 8 chips fit one host; bigger slices are built of 4-chip hosts.
      if ((size <= 8)); then HOSTS=1; else HOSTS=$((size / 4)); fi
      ;;
  esac
  GENERATION="$gen"
  if [[ -z "$RUNTIME" ]]; then
    case "$gen" in
      v5litepod) RUNTIME="v2-alpha-tpuv5-lite" ;;
      v5p) RUNTIME="v2-alpha-tpuv5" ;;
      v6e) RUNTIME="v2-alpha-tpuv6e" ;;
      *) RUNTIME="tpu-ubuntu2204-base" ;;
    esac
  fi
}

# Sets CONFIG_FILE, VARIANT, STAGE_DIR (the workdir's folder: stageN or the variant's name),
# FROM_DIR (the folder of the stage it starts from, "" for none) and RUN_NAME. The file must
# exist in this checkout (it is what workers get); the variant is checked by the file itself.
check_config() {
  local file="${CONFIG%%:*}" variant="1"
  if [[ "$CONFIG" == *:* ]]; then variant="${CONFIG#*:}"; fi
  [[ "$file" == *.py || "$file" == */* ]] || file="configs/$file.py"
  [[ -f "$REPO_ROOT/$file" ]] ||
    die "config file '$file' does not exist in $REPO_ROOT; use a path relative to the repository root, e.g. --config configs/embedded_default.py:1 or configs/jasper_paper.py:2"
  [[ "$variant" =~ ^[A-Za-z0-9_-]+$ ]] ||
    die "config '$CONFIG': after ':' comes a stage number or a variant name (letters, digits, '-', '_'), e.g. $file:2 or $file:long"
  CONFIG_FILE="$file"
  VARIANT="$variant"
  read_config
  if [[ -z "$RUN_NAME" ]]; then
    RUN_NAME="${file##*/}"
    RUN_NAME="${RUN_NAME%.py}"
  fi
}

stage_dir() { # a variant's workdir folder: stageN for stage numbers, else the variant's name
  if [[ "$1" =~ ^[0-9]+$ ]]; then printf 'stage%s' "$1"; else printf '%s' "$1"; fi
}

# Asks the config file (through jasper_jax.config, in Python) whether VARIANT exists, which
# stage it is and which variant's workdir it starts from (numbers: the previous stage; names:
# the file's VARIANTS table), and validates it with the overrides `train` will pass. A wrong
# variant or override: one line naming the fix, exit 2, before any cloud command.
read_config() {
  local python="${JASPER_PYTHON:-python3}" answer stage from
  command -v "$python" >/dev/null 2>&1 ||
    die "reading the config needs Python with this project installed: '$python' not found; set JASPER_PYTHON to the project's venv python"
  local -a overrides=("${OVERRIDES[@]}")
  local i
  for i in "${!COPY_FIELDS[@]}"; do # what --copy-model passes (the worker's $HOME stands as ~)
    overrides+=("--config.${COPY_FIELDS[$i]}=~/$MODELS_DIR/${COPY_NAMES[$i]}")
  done
  answer="$(cd "$REPO_ROOT" && JAX_PLATFORMS=cpu "$python" - "$REPO_ROOT" "$CONFIG_FILE" \
    "$VARIANT" "${overrides[@]}" <<'PY'
import sys
from pathlib import Path

root, file, variant, *overrides = sys.argv[1:]
sys.path.insert(0, root)


def fail(message: str) -> None:
    print(f"tpu.sh: error: config '{file}:{variant}': {message}", file=sys.stderr)
    sys.exit(2)


try:
    from jasper_jax.config import apply_overrides, import_config_module, validate_config
    from jasper_jax.errors import one_line
except ImportError as e:
    fail(f"reading it needs this project's packages ({e}); set JASPER_PYTHON to its venv python")
try:
    module = import_config_module(Path(root, file))
    stages = [str(s) for s in getattr(module, "STAGES", {})]
    named = {str(k): str(v) for k, v in getattr(module, "VARIANTS", {}).items()}
    known = stages + list(named)
    if known and variant not in known:
        fail(f"no such variant; {file} has {', '.join(known)}, e.g. {file}:{known[-1]}")
    config = module.get_config(variant)
    stage = int(config.stage)
    start = named.get(variant, str(stage - 1) if stage > 1 else "")
    given = any(o.startswith("--config.init_from=") for o in overrides)
    apply_overrides(config, ([] if given or not start else ["--config.init_from=x"]) + overrides)
    validate_config(config)
except SystemExit:
    raise
except Exception as e:  # the config file is user code: whatever it raises, in one line
    fail(one_line(e))
print(stage, start or "-")
PY
  )" || exit 2
  read -r stage from <<<"$answer"
  CONFIG_STAGE="$stage"
  STAGE_DIR="$(stage_dir "$VARIANT")"
  FROM_DIR=""
  if [[ "$from" != - ]]; then FROM_DIR="$(stage_dir "$from")"; fi
  if [[ -n "$AFTER" ]]; then
    [[ "$AFTER" =~ ^[A-Za-z0-9_-]+$ && "$AFTER" != "$VARIANT" ]] ||
      die "--after '$AFTER': name another variant of $CONFIG_FILE (a stage number or a name such as pairs), e.g. --config $CONFIG_FILE:4 --after pairs"
    [[ -n "$FROM_DIR" ]] ||
      die "--after '$AFTER': $CONFIG_FILE:$VARIANT starts from no earlier stage; drop --after"
    FROM_DIR="$(stage_dir "$AFTER")"
  fi
}

# gs://BUCKET[/PATH] with a valid bucket name (3-222 of a-z 0-9 . _ -) and no spaces.
is_gs_path() {
  [[ "$1" =~ ^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[^[:space:]]*)?$ ]]
}

check_bucket() {
  if [[ -z "$BUCKET" ]]; then return 0; fi
  BUCKET="gs://${BUCKET#gs://}"
  BUCKET="${BUCKET%/}"
  is_gs_path "$BUCKET" ||
    die "bucket '$BUCKET' is not a bucket name; use --bucket gs://BUCKET or gs://BUCKET/PREFIX"
}

# --copy-model [FIELD=]SRC -> COPY_FIELDS, COPY_SOURCES (gs:// or an absolute local folder) and
# COPY_NAMES (the copy's folder under ~/jasper-models on every worker).
check_copies() {
  local spec field src name o
  for spec in "${COPIES[@]}"; do
    field="model.init_hf" src="$spec"
    if [[ "$spec" =~ ^([A-Za-z_][A-Za-z0-9_.]*)=(.*)$ ]]; then
      field="${BASH_REMATCH[1]}" src="${BASH_REMATCH[2]}"
    fi
    if [[ "$src" == gs://* ]]; then
      src="${src%/}"
      is_gs_path "$src" ||
        die "--copy-model '$spec': '$src' is not a gs:// path; use gs://BUCKET/PATH/TO/MODEL"
    else
      [[ -d "$src" ]] ||
        die "--copy-model '$spec': '$src' is not a local folder; give the model's folder (with config.json) or a gs:// path"
      src="$(cd "$src" && pwd)"
    fi
    name="${src##*/}"
    [[ "$name" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] ||
      die "--copy-model '$spec': the folder name '$name' needs plain letters, digits, '.', '-' or '_'; rename or link it"
    for o in "${COPY_NAMES[@]}"; do
      [[ "$o" != "$name" ]] || die "--copy-model: two models named '$name'; rename one folder"
    done
    for o in "${COPY_FIELDS[@]}"; do
      [[ "$o" != "$field" ]] || die "--copy-model: two models for $field; give one"
    done
    for o in "${OVERRIDES[@]}"; do
      [[ "$o" != "--config.$field="* ]] || die "--copy-model sets $field to its copy; drop '$o'"
    done
    COPY_FIELDS+=("$field") COPY_SOURCES+=("$src") COPY_NAMES+=("$name")
  done
}

# The stage's workdir: on the bucket (shared by all hosts), or local to worker 0 on one host.
resolve_workdir() {
  if [[ -n "$BUCKET" ]]; then
    WORKDIR_BASE="$BUCKET/$RUN_NAME"
  else
    ((HOSTS == 1)) ||
      die "$ACCELERATOR has $HOSTS hosts, which must share one workdir: set --bucket gs://BUCKET (or JASPER_BUCKET); checkpoints are written there directly"
    WORKDIR_BASE="runs/$RUN_NAME" # relative to the code folder on the worker
  fi
  [[ -n "$WORKDIR" ]] || WORKDIR="$WORKDIR_BASE/$STAGE_DIR"
  if [[ "$WORKDIR" != gs://* ]] && ((HOSTS > 1)); then
    die "--workdir '$WORKDIR' is local, but the $HOSTS hosts of $ACCELERATOR must share it: use a gs:// path"
  fi
}

validate() {
  [[ -n "$COMMAND" ]] || die "no command given; one of create, setup, train, status, logs, fetch, delete (see --help)"
  case "$COMMAND" in
    create | setup | copy | train | status | logs | fetch | delete) ;;
    *) die "unknown command '$COMMAND'; one of create, setup, train, status, logs, fetch, delete" ;;
  esac
  [[ -n "$PROJECT" ]] || die "no project: set --project ID (or JASPER_PROJECT)"
  [[ -n "$ZONE" ]] || die "no zone: set --zone ZONE (or JASPER_ZONE), one where $ACCELERATOR is offered, e.g. us-central2-b for v4"
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "TPU name '$NAME': use lower-case letters, digits and '-', starting with a letter"
  check_accelerator
  [[ "$SOURCE" == copy || "$SOURCE" == git ]] || die "--source '$SOURCE': use copy or git"
  [[ "$SOURCE" == copy || -n "$REPO_URL" ]] || die "--source git needs --repo URL (and --ref)"
  if ((${#OVERRIDES[@]})) && [[ "$COMMAND" != train ]]; then
    die "--config.* overrides apply to 'train' only (got them with '$COMMAND')"
  fi
  if ((${#COPIES[@]})) && [[ "$COMMAND" != train ]]; then
    die "--copy-model applies to 'train' only (got it with '$COMMAND')"
  fi
  if [[ "$COMMAND" == train || "$COMMAND" == fetch ]]; then
    check_copies
    check_config
    check_bucket
    resolve_workdir
  else
    check_bucket
  fi
  if [[ -z "$QUEUED" ]]; then
    if [[ "$GENERATION" == v5p ]]; then QUEUED=1; else QUEUED=0; fi
  fi
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login', or add --dry-run to only print the commands"
  fi
}

# --- gcloud command pieces ------------------------------------------------------------------

ssh_cmd() { # ssh_cmd WORKER REMOTE_COMMAND
  local -a cmd=(gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --project="$PROJECT"
    --worker="$1")
  if ((INTERNAL_IP)); then cmd+=(--internal-ip); fi
  run "${cmd[@]}" --command="$2"
}

scp_cmd() { # scp_cmd WORKER SRC... DEST
  local worker="$1"
  shift
  local -a cmd=(gcloud compute tpus tpu-vm scp "$@" --zone="$ZONE" --project="$PROJECT"
    --worker="$worker")
  if ((INTERNAL_IP)); then cmd+=(--internal-ip); fi
  run "${cmd[@]}"
}

# Remote commands run in the login shell's home; code in ~/jasper-jax, Python 3.11 in
# ~/jasper-venv (TPU images ship Python 3.10, the project needs 3.11: uv fetches it).
REMOTE_DIR="jasper-jax"
REMOTE_VENV="jasper-venv"
MODELS_DIR="jasper-models" # --copy-model's copies, outside the code folder `setup` replaces
ACTIVATE="cd \"\$HOME/$REMOTE_DIR\" && . \"\$HOME/$REMOTE_VENV/bin/activate\""

# --- commands -------------------------------------------------------------------------------

cmd_create() {
  local -a flags=(--zone="$ZONE" --project="$PROJECT" --accelerator-type="$ACCELERATOR")
  if ((SPOT)); then flags+=(--spot); fi
  note "$ACCELERATOR: $HOSTS host(s); runtime $RUNTIME"
  note "reuse the TPU if it exists:"
  if run gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" --project="$PROJECT" \
    --format="value(state)" && ((!DRY_RUN)); then
    note "TPU $NAME exists; reusing it"
    return 0
  fi
  note "otherwise create it:"
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
      --runtime-version="$RUNTIME" "${flags[@]}"
    note "wait for the queued resource (polled every 30 s until ACTIVE):"
    wait_queued
  else
    run gcloud compute tpus tpu-vm create "$NAME" --version="$RUNTIME" "${flags[@]}"
  fi
}

wait_queued() {
  local state
  while :; do
    state="$(run gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" \
      --project="$PROJECT" --format="value(state.state)")"
    if ((DRY_RUN)); then
      printf '%s\n' "$state"
      return 0
    fi
    case "$state" in
      ACTIVE) note "queued resource $NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING)
        die "queued resource $NAME is $state; see 'gcloud compute tpus queued-resources describe $NAME --zone=$ZONE', then delete and create again" ;;
    esac
    note "queued resource $NAME: ${state:-unknown}; waiting"
    sleep 30
  done
}

cmd_setup() {
  local get_code install
  if [[ "$SOURCE" == copy ]]; then
    # The checkout as it is (uncommitted edits included), minus runs, caches and git history.
    local tarball="${TMPDIR:-/tmp}/jasper-jax-src-$NAME.tar.gz"
    run tar -czf "$tarball" --exclude=./.git --exclude=./runs --exclude=./exports \
      --exclude=__pycache__ --exclude='*.egg-info' --exclude=.venv -C "$REPO_ROOT" .
    scp_cmd all "$tarball" "$NAME:jasper-jax-src.tar.gz"
    get_code="rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf jasper-jax-src.tar.gz -C $REMOTE_DIR"
  else
    get_code="rm -rf $REMOTE_DIR && git clone $(quote_words "$REPO_URL") $REMOTE_DIR"
    [[ -z "$REF" ]] || get_code+=" && git -C $REMOTE_DIR checkout $(quote_words "$REF")"
  fi
  install="uv pip install -e '.[gcs]' 'jax[tpu]'"
  if ((TEACHERS)); then
    # PyPI's default torch wheel for Linux carries GBs of CUDA; the CPU index has the small one.
    install="uv pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    install+=" && uv pip install -e '.[teachers,gcs]' 'jax[tpu]'"
  fi
  ssh_cmd all "set -e; $get_code; python3 -m pip install --user --quiet uv; export PATH=\"\$HOME/.local/bin:\$PATH\"; test -x $REMOTE_VENV/bin/python || uv venv --python 3.11 $REMOTE_VENV; $ACTIVATE && $install && python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
}

# Copies each --copy-model source to ~/jasper-models/NAME on every worker (replacing an older
# copy): a gs:// path by `gcloud storage rsync` on each worker (only changed files move), a local
# folder by one scp to all workers.
cmd_copy_models() {
  local i src name
  for i in "${!COPY_SOURCES[@]}"; do
    src="${COPY_SOURCES[$i]}" name="${COPY_NAMES[$i]}"
    note "${COPY_FIELDS[$i]}: $src -> ~/$MODELS_DIR/$name on every worker"
    if [[ "$src" == gs://* ]]; then
      ssh_cmd all "set -e; mkdir -p $MODELS_DIR/$name; gcloud storage rsync --recursive --delete-unmatched-destination-objects $(quote_words "$src") $MODELS_DIR/$name"
    else
      ssh_cmd all "rm -rf $MODELS_DIR/$name && mkdir -p $MODELS_DIR"
      scp_cmd all --recurse "$src" "$NAME:$MODELS_DIR/"
    fi
  done
}

train_words() {
  TRAIN_WORDS=(jasper-jax train --config "$CONFIG_FILE:$VARIANT" --workdir "$WORKDIR")
  local o has_init=0
  for o in "${OVERRIDES[@]}"; do
    if [[ "$o" == --config.init_from=* ]]; then has_init=1; fi
  done
  if [[ -n "$FROM_DIR" ]] && ((!has_init)); then
    # A stage starts from the weights of the one the config names (stage N: N-1) unless told.
    TRAIN_WORDS+=(--config.init_from="$WORKDIR_BASE/$FROM_DIR")
  fi
  TRAIN_WORDS+=("${OVERRIDES[@]}")
}

cmd_train() {
  local train i log="jasper-logs/$RUN_NAME-$STAGE_DIR.log"
  train_words
  train="$(quote_words "${TRAIN_WORDS[@]}")"
  for i in "${!COPY_FIELDS[@]}"; do # $HOME: expanded by the worker's shell
    train+=" --config.${COPY_FIELDS[$i]}=\"\$HOME/$MODELS_DIR/${COPY_NAMES[$i]}\""
  done
  note "$ACCELERATOR: $HOSTS host(s); $CONFIG_FILE:$VARIANT (stage $CONFIG_STAGE); workdir $WORKDIR"
  cmd_copy_models
  # No per-worker flags: on a slice `jasper-jax train` initialises jax.distributed itself.
  if ((DETACH)); then
    ssh_cmd all "$ACTIVATE && mkdir -p \"\$HOME/jasper-logs\" && nohup $train > \"\$HOME/$log\" 2>&1 < /dev/null & echo started on \$(hostname)"
    note "follow it with: launch/tpu.sh ... logs"
  else
    ssh_cmd all "set -o pipefail; $ACTIVATE && mkdir -p \"\$HOME/jasper-logs\" && $train 2>&1 | tee \"\$HOME/$log\""
  fi
}

cmd_status() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" --project="$PROJECT" \
      --format="value(state.state)"
  fi
  run gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" --project="$PROJECT" \
    --format="yaml(state,acceleratorType,runtimeVersion,health,healthDescription)"
  # [j] keeps pgrep from matching the shell that runs it.
  ssh_cmd all "hostname; pgrep -af '[j]asper-jax train' || echo 'no jasper-jax train running'; tail -n 3 \"\$HOME\"/jasper-logs/*.log 2>/dev/null || true"
}

cmd_logs() {
  ssh_cmd 0 "tail -n 100 -F \"\$HOME\"/jasper-logs/*.log"
}

cmd_fetch() {
  local remote_export="exports/$RUN_NAME-$STAGE_DIR" out="${OUTPUT:-exports}"
  local export_words
  # CPU: worker 0 alone cannot use the TPUs of a multi-host slice, and export needs none.
  export_words="JAX_PLATFORMS=cpu $(quote_words jasper-jax export --workdir "$WORKDIR" --output "$remote_export")"
  run mkdir -p "$out"
  if [[ -n "$BUCKET" ]]; then
    local gcs="$BUCKET/$RUN_NAME/export/$RUN_NAME-$STAGE_DIR"
    ssh_cmd 0 "$ACTIVATE && $export_words && gcloud storage cp -r $(quote_words "$remote_export" "${gcs%/*}/")"
    run gcloud storage cp -r "$gcs" "$out/"
  else
    ssh_cmd 0 "$ACTIVATE && $export_words"
    scp_cmd 0 --recurse "$NAME:$REMOTE_DIR/$remote_export" "$out/"
  fi
  note "model in $out/"
}

cmd_delete() {
  if ((QUEUED)); then
    # --force also deletes the TPU the queued resource holds.
    run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" --project="$PROJECT" \
      --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --project="$PROJECT" --quiet
  fi
}

main() {
  REPO_ROOT="$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)"
  NAME="${JASPER_TPU_NAME:-jasper-tpu}"
  PROJECT="${JASPER_PROJECT:-}"
  ZONE="${JASPER_ZONE:-}"
  ACCELERATOR="${JASPER_ACCELERATOR:-v4-8}"
  RUNTIME="${JASPER_RUNTIME:-}"
  BUCKET="${JASPER_BUCKET:-}"
  CONFIG="${JASPER_CONFIG:-configs/embedded_default.py:1}"
  WORKDIR="" RUN_NAME="" AFTER="" SOURCE="copy" REPO_URL="" REF="" OUTPUT="" COMMAND=""
  DRY_RUN=0 QUEUED="" SPOT=0 INTERNAL_IP=0 TEACHERS=0 DETACH=0 HOSTS=1 GENERATION=""
  OVERRIDES=() COPIES=() COPY_FIELDS=() COPY_SOURCES=() COPY_NAMES=()
  CONFIG_FILE="" VARIANT="" CONFIG_STAGE="" STAGE_DIR="" FROM_DIR=""
  parse_args "$@"
  validate
  case "$COMMAND" in
    create) cmd_create ;;
    setup | copy) cmd_setup ;;
    train) cmd_train ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    fetch) cmd_fetch ;;
    delete) cmd_delete ;;
  esac
}

main "$@"
