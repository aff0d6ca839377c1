#!/usr/bin/env bash
# Proof on arm64: build the edgecv wheel from this checkout and check the device side the way a Raspberry Pi
# OS 64-bit (Bookworm) user installs it, under qemu-user emulation in a Debian Bookworm arm64 root:
#
#   sudo scripts/arm64-check.sh [--frames N] [--broker HOST:PORT] [--cpu cortex-a72|cortex-a76] [--rebuild]
#
# 1. builds the wheel (from a copy of the working tree, so the checkout gets no build/ folder);
# 2. makes (once) a Bookworm arm64 root with debootstrap under $EDGECV_ARM64_ROOT (default
#    /var/cache/edgecv-arm64) and reuses it afterwards; installs qemu-user-static, binfmt-support and
#    debootstrap with apt-get if missing;
# 3. in the guest: a fresh venv, `pip install '<wheel>[litert]'` (prebuilt wheels only), `edgecv-agent
#    check-config`, `edgecv-agent bench` for onnxruntime and LiteRT;
# 4. for each runtime, `edgecv-agent run` in the guest against the host's broker with the camera
#    synthetic:fashion-mnist, until N predictions arrived on the host; the same wheel runs the same frames on
#    x86 as the reference; the predictions are scored against the camera's `truth` and frame by frame against x86;
# 5. prints the wheel versions resolved in the guest, the bench table and the accuracies.
# Exits non-zero when a step fails or an accuracy is off. Mounts are removed on every exit path. Logs of the
# last run stay in $EDGECV_ARM64_ROOT/last-run/. Timings under emulation say nothing about a real Pi.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

cache="${EDGECV_ARM64_ROOT:-/var/cache/edgecv-arm64}"
frames=1000
broker="127.0.0.1:1883"
cpu="${EDGECV_ARM64_CPU:-cortex-a72}"
bench_runs=200
timeout_s=900
mirror="${EDGECV_ARM64_MIRROR:-}"
host_python="${PYTHON:-python3}"
niceness="${EDGECV_ARM64_NICE:-10}"
min_accuracy=0.75
max_gap=0.005
min_agreement=0.99
rebuild=0

# Packages the guest needs on top of minbase; dataset-fashion-mnist feeds the synthetic camera.
guest_packages="python3,python3-venv,ca-certificates,dataset-fashion-mnist"
suite="bookworm"
prefix="edgecv-arm64-check"

usage() {
  sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options:
  --frames N           predictions scored per runtime (default 1000)
  --broker HOST:PORT   the host's MQTT broker (default 127.0.0.1:1883; the guest shares the host's network)
  --cpu NAME           emulated CPU: cortex-a72 (Pi 4, default) or cortex-a76 (Pi 5); "max" (qemu's default)
                       makes LiteRT's int8 results wrong, so the check fails with it (a test of the check)
  --bench-runs N       timed inferences per bench row (default 200)
  --timeout S          seconds to wait for one run's N predictions (default 900)
  --mirror URL         Debian mirror for debootstrap (default: the first Debian mirror in /etc/apt/sources.list*)
  --rebuild            delete the prepared arm64 root and make it again
  --min-accuracy A     fail below this accuracy (default 0.75: catches a model broken on both machines)
  --max-gap G          fail when arm64 and x86 accuracy differ by more than G (default 0.005)
  --min-agreement R    fail when fewer than this share of top-1 predictions equal x86's (default 0.99)
  -h, --help           this help
Environment: EDGECV_ARM64_ROOT (cache dir), EDGECV_ARM64_CPU, EDGECV_ARM64_MIRROR, EDGECV_ARM64_NICE (default
10), PYTHON (host interpreter for the wheel build and the x86 reference venv, default python3).
EOF
}

die() { echo "arm64-check: error: $*" >&2; exit 1; }
step() { echo "arm64-check: == $*" >&2; }
note() { echo "arm64-check: $*" >&2; }

positive_int() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive integer, got '$2'"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --frames) frames="${2:-}"; positive_int --frames "$frames"; shift 2 ;;
    --broker) broker="${2:-}"; shift 2 ;;
    --cpu) cpu="${2:-}"; shift 2 ;;
    --bench-runs) bench_runs="${2:-}"; positive_int --bench-runs "$bench_runs"; shift 2 ;;
    --timeout) timeout_s="${2:-}"; positive_int --timeout "$timeout_s"; shift 2 ;;
    --mirror) mirror="${2:-}"; shift 2 ;;
    --rebuild) rebuild=1; shift ;;
    --min-accuracy) min_accuracy="${2:-}"; shift 2 ;;
    --max-gap) max_gap="${2:-}"; shift 2 ;;
    --min-agreement) min_agreement="${2:-}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "Unknown option '$1'; see --help" ;;
  esac
done

case "$cpu" in
  cortex-a72|cortex-a76|max) ;;
  *) die "--cpu '$cpu': use cortex-a72 (Pi 4) or cortex-a76 (Pi 5)" ;;
esac
[[ "$broker" =~ ^([^:]+):([0-9]+)$ ]] || die "--broker '$broker': expected HOST:PORT, e.g. 127.0.0.1:1883"
broker_host="${BASH_REMATCH[1]}"
broker_port="${BASH_REMATCH[2]}"
[[ "$cache" = /* && "$cache" != "/" && "$cache" != *[[:space:]]* ]] \
  || die "EDGECV_ARM64_ROOT '$cache' must be an absolute path other than / and without spaces"
[ "$(id -u)" -eq 0 ] || die "This needs root (debootstrap, chroot, mounts): run it with sudo"

root="$cache/$suite-arm64"
run="$cache/last-run"
guest_dir="/opt/edgecv-check"           # inside the guest
gvenv="$guest_dir/venv"
x86_venv="$cache/x86-venv"
guest=(nice -n "$niceness" env "QEMU_CPU=$cpu" chroot "$root" /usr/bin/env -i
       PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
       "QEMU_CPU=$cpu" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120)

# ------------------------------------------------------------------------------------------- clean-up
child=""        # the long-running command in the foreground, in its own process group
agent_pid=""
scorer_pid=""
devices=()      # throw-away device ids whose retained topics are cleared at the end
locked=0        # the mounts and the cache are ours only once we hold the cache's lock

unmount_guest() {
  # Everything mounted under the root, deepest first (rbind brings sub-mounts of /sys and /dev along).
  local target
  while read -r target; do
    umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || note "could not unmount $target"
  done < <(findmnt -rn -o TARGET | awk -v r="$root/" 'index($0, r) == 1' | sort -r)
}

stop_pid_group() {  # PID: TERM to its process group, KILL after 30 s
  local pid="$1"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  timeout 30 tail --pid="$pid" -f /dev/null || kill -KILL -- "-$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  set +e
  [ "$locked" -eq 1 ] || exit "$status"   # another run owns the cache: leave its mounts alone
  for pid in "$child" "$agent_pid" "$scorer_pid"; do
    [ -z "$pid" ] || stop_pid_group "$pid"
  done
  unmount_guest
  if [ "${#devices[@]}" -gt 0 ] && [ -x "$x86_venv/bin/python" ]; then
    "$x86_venv/bin/python" "$here/arm64_score.py" forget --broker "$broker" --prefix "$prefix" \
      --device "${devices[@]}" >/dev/null 2>&1
  fi
  [ "$status" -eq 0 ] || echo "arm64-check: FAILED (logs: $run/)" >&2
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run_logged NAME CMD...: CMD in its own process group (a signal to this script stops all of it), output in
# $run/NAME.log; on failure the log's tail is shown and the check stops.
run_logged() {
  local name="$1" status=0
  shift
  setsid "$@" >"$run/$name.log" 2>&1 &
  child=$!
  wait "$child" || status=$?
  child=""
  if [ "$status" -ne 0 ]; then
    tail -n 25 "$run/$name.log" | sed 's/^/  | /' >&2
    die "$name failed (exit $status); full log: $run/$name.log"
  fi
}

# ------------------------------------------------------------------------------------------- host set-up
mkdir -p "$cache"
exec {lock_fd}>"$cache/.lock"
flock -n "$lock_fd" || die "Another arm64-check is using $cache; wait for it or set EDGECV_ARM64_ROOT"
locked=1
unmount_guest   # leftovers of a run that was killed with SIGKILL
rm -rf "$run"
mkdir -p "$run"

step "host packages"
missing=()
for pkg in qemu-user-static binfmt-support debootstrap; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  note "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  run_logged apt-install sh -c \
    "apt-get install -y ${missing[*]} || { apt-get update && apt-get install -y ${missing[*]}; }"
fi
command -v "$host_python" >/dev/null 2>&1 || die "No '$host_python' on PATH: install python3 or set PYTHON"
"$host_python" -c 'import ensurepip, venv' 2>/dev/null \
  || die "'$host_python' cannot make venvs: apt-get install python3-venv (or set PYTHON)"

if [ "$(uname -m)" != "aarch64" ]; then
  binfmt=/proc/sys/fs/binfmt_misc
  if [ ! -e "$binfmt/register" ]; then
    mount -t binfmt_misc binfmt_misc "$binfmt" \
      || die "Cannot mount binfmt_misc on $binfmt (a container without the privilege?); run on the host"
  fi
  [ -e "$binfmt/qemu-aarch64" ] || update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  grep -qx enabled "$binfmt/qemu-aarch64" 2>/dev/null \
    || die "The binfmt handler qemu-aarch64 is not enabled; check 'update-binfmts --display qemu-aarch64'"
fi

step "wheel"
src="$run/src"
mkdir -p "$src" "$run/dist"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked and new (not ignored) files: what a commit of this working tree would hold.
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"; done | xargs -0 cp --parents -t "$src")
else
  (cd "$repo" && tar --exclude=./build --exclude=./dist --exclude='*/__pycache__' -cf - .) | tar -xf - -C "$src"
fi
run_logged wheel-build "$host_python" -m pip wheel --no-deps -w "$run/dist" "$src"
wheel="$(find "$run/dist" -name 'edgecv-*.whl' | head -n 1)"
[ -n "$wheel" ] || die "pip wheel produced no edgecv wheel; see $run/wheel-build.log"
wheel_name="$(basename "$wheel")"
note "built $wheel_name"

step "x86 reference venv ($x86_venv)"
[ -x "$x86_venv/bin/python" ] || run_logged x86-venv "$host_python" -m venv "$x86_venv"
run_logged x86-install "$x86_venv/bin/python" -m pip install "${wheel}[litert]"
# Same version number, new code: the reinstall makes the venv hold exactly this wheel.
run_logged x86-reinstall "$x86_venv/bin/python" -m pip install --force-reinstall --no-deps "$wheel"

# ------------------------------------------------------------------------------------------- the arm64 root
find_mirror() {
  local uri
  uri="$(grep -rhoE '^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)https?://[^[:space:]]+' \
           /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
         | grep -oE 'https?://[^[:space:]]+' | grep -E '/debian/?$' | head -n 1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

wipe_root() {
  if findmnt -rn -o TARGET | awk -v r="$root" '$0 == r || index($0, r "/") == 1' | grep -q .; then
    die "Something is still mounted under $root; unmount it (umount -R) before it can be rebuilt"
  fi
  rm -rf "$root" "$cache/.debootstrap-ok"
}

# $cache/.debootstrap-ok exists while the root is usable: after the first stage, and again after the second.
step "arm64 root ($root)"
[ "$rebuild" -eq 0 ] || wipe_root
if [ ! -f "$cache/.debootstrap-ok" ]; then
  wipe_root
  mirror="${mirror:-$(find_mirror)}"
  note "debootstrap first stage from $mirror"
  run_logged debootstrap-first-stage debootstrap --arch=arm64 --foreign --variant=minbase \
    --include="$guest_packages" "$suite" "$root" "$mirror"
  touch "$cache/.debootstrap-ok"
fi
if [ -d "$root/debootstrap" ]; then
  note "debootstrap second stage under emulation (a few minutes on 2 cores)"
  rm -f "$cache/.debootstrap-ok"   # if it fails, the next run starts the root again from scratch
  run_logged debootstrap-second-stage "${guest[@]}" /debootstrap/debootstrap --second-stage
  touch "$cache/.debootstrap-ok"
  unmount_guest   # debootstrap mounts /proc and /sys itself
fi

# Guest configuration, cheap to repeat: name resolution, the host's pip settings and extra CA certificates
# (never the per-user pip config: it may point at x86-only wheel folders), and a Pi-like /proc/cpuinfo.
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
[ -s "$root/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n' >"$root/etc/hosts"
[ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$root/etc/pip.conf"
if [ -d /etc/xdg/pip ]; then
  mkdir -p "$root/etc/xdg" && rm -rf "$root/etc/xdg/pip" && cp -r /etc/xdg/pip "$root/etc/xdg/"
fi
ca_changed=0
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$crt" ] || continue
  if ! cmp -s "$crt" "$root/usr/local/share/ca-certificates/$(basename "$crt")"; then
    cp "$crt" "$root/usr/local/share/ca-certificates/"
    ca_changed=1
  fi
done
[ "$ca_changed" -eq 0 ] || run_logged guest-ca "${guest[@]}" update-ca-certificates
# The guest otherwise sees the host's x86 /proc/cpuinfo, on which `import onnxruntime` crashes (SIGSEGV).
case "$cpu" in
  cortex-a72)
    features="fp asimd evtstrm crc32 cpuid"
    variant=0x0; part=0xd08; revision=3; board="Raspberry Pi 4" ;;
  cortex-a76|max)
    features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
    variant=0x4; part=0xd0b; revision=1; board="Raspberry Pi 5" ;;
esac
cpuinfo="$cache/cpuinfo-$cpu"
: >"$cpuinfo"
for ((i = 0; i < $(nproc --all); i++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\n' \
    "$i" "$features" >>"$cpuinfo"
  printf 'CPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %d\n\n' "$variant" "$part" "$revision" >>"$cpuinfo"
done
printf 'Hardware\t: BCM2835\nModel\t\t: %s (qemu-user %s, edgecv arm64 check)\n' "$board" "$cpu" >>"$cpuinfo"

mount -t proc proc "$root/proc"
mount --bind "$cpuinfo" "$root/proc/cpuinfo"
mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"
mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"

# A root made by an older version of this script may lack a package: add what is missing.
pkg_states="$("${guest[@]}" dpkg-query -W -f='${db:Status-Abbrev}\n' ${guest_packages//,/ } 2>/dev/null)" \
  || pkg_states="missing"
if grep -qv '^ii' <<<"$pkg_states"; then
  note "installing guest packages: ${guest_packages//,/ }"
  run_logged guest-apt "${guest[@]}" sh -c "apt-get update && apt-get install -y ${guest_packages//,/ }"
fi

# ------------------------------------------------------------------------------------------- install in the guest
step "install '${wheel_name}[litert]' in a fresh guest venv"
guest_os="$("${guest[@]}" sh -c '. /etc/os-release; echo "$PRETTY_NAME"')"
guest_py="$("${guest[@]}" python3 -c 'import platform as p; print(p.machine(), "Python", p.python_version(),
  "glibc", p.libc_ver()[1])')"
rm -rf "${root:?}$guest_dir"
mkdir -p "$root$guest_dir/dist"
cp "$wheel" "$root$guest_dir/dist/"
run_logged guest-venv "${guest[@]}" python3 -m venv "$gvenv"
# Prebuilt wheels only: a dependency without an aarch64 wheel would mean compiling on the Pi, which is a failure.
started=$SECONDS
run_logged guest-pip-install "${guest[@]}" "$gvenv/bin/python" -m pip install --only-binary=:all: \
  --report "$guest_dir/pip-report.json" "$guest_dir/dist/${wheel_name}[litert]"
install_s=$((SECONDS - started))
run_logged guest-pip-check "${guest[@]}" "$gvenv/bin/python" -m pip check
wheels="$("${guest[@]}" "$gvenv/bin/python" - "$guest_dir/pip-report.json" <<'EOF'
import json, sys
from urllib.parse import urlparse
report = json.load(open(sys.argv[1]))
for item in sorted(report["install"], key=lambda i: i["metadata"]["name"].lower()):
    url = item.get("download_info", {}).get("url", "")
    print(f"  {item['metadata']['name']:<24} {item['metadata']['version']:<12} {urlparse(url).path.rsplit('/', 1)[-1]}")
EOF
)"
venv_mb="$(du -sm "$root$gvenv" | cut -f1)"

# Paths inside the installed wheel: the demo bundle and its public key ship as package data.
read -r gbundle gkey < <("${guest[@]}" "$gvenv/bin/python" -c \
  'from edgecv.agent.resources import demo_bundle, demo_public_key; print(demo_bundle(), demo_public_key())')
read -r xbundle xkey < <("$x86_venv/bin/python" -c \
  'from edgecv.agent.resources import demo_bundle, demo_public_key; print(demo_bundle(), demo_public_key())')
{ [ -n "${gkey:-}" ] && [ -n "${xkey:-}" ]; } || die "The installed wheel does not locate its demo bundle"
x86_versions="$("$x86_venv/bin/python" -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(onnxruntime|ai-edge-litert|numpy|opencv-python-headless)==' | tr '\n' ' ')"

# write_config FILE DEVICE RUNTIME STORE BUNDLE KEYRING
write_config() {
  cat >"$1" <<EOF
# Written by scripts/arm64-check.sh: one camera, every frame published, so seq k is Fashion-MNIST test image k.
device_id = "$2"
prefix = "$prefix"
log_level = "info"

[broker]
host = "$broker_host"
port = $broker_port
reconnect_min_s = 0.2
reconnect_max_s = 2.0

[[camera]]
name = "cam0"
source = "synthetic:fashion-mnist"
fps = 0.0

[model]
store = "$4"
bundle = "$5"
runtime = "$3"
threads = 1

[publish]
qos = 1
mode = "every"

[security]
keyring = "$6"

[homeassistant]
enabled = false
EOF
}

runtimes=(onnxruntime litert)
for rt in "${runtimes[@]}"; do
  write_config "$root$guest_dir/agent-$rt.toml" "arm64-check-$rt-$$" "$rt" "$guest_dir/models-$rt" "$gbundle" "$gkey"
  write_config "$run/x86-$rt.toml" "x86-check-$rt-$$" "$rt" "$run/x86-models-$rt" "$xbundle" "$xkey"
done

step "check-config in the guest"
run_logged guest-check-config "${guest[@]}" "$gvenv/bin/edgecv-agent" check-config "$guest_dir/agent-litert.toml"
sed 's/^/  /' "$run/guest-check-config.log" >&2

step "bench in the guest (both runtimes; emulated timings)"
run_logged guest-bench "${guest[@]}" "$gvenv/bin/edgecv-agent" bench --bundle "$gbundle" --runtime auto \
  --threads 1 --runs "$bench_runs"
for rt in "${runtimes[@]}"; do
  grep -q "^$rt " "$run/guest-bench.log" || die "bench has no $rt row; see $run/guest-bench.log"
done
bench_table="$(sed -n '/: preprocess + inference/,$p' "$run/guest-bench.log" | grep -vE '^(INFO: |[0-9]{4}-[0-9]{2}-)')"

# collect SIDE RUNTIME AGENT-CMD...: start the collector, wait for its subscription, start the agent, wait for N
# predictions (or the agent's early death), stop the agent with SIGTERM and check it exits 0.
collect() {
  local side="$1" rt="$2" name="$1-$2" line status=0 finished=""
  shift 2
  local device="$side-check-$rt-$$" fifo="$run/$name.fifo"
  devices+=("$device")
  mkfifo "$fifo"
  setsid "$x86_venv/bin/python" "$here/arm64_score.py" collect --broker "$broker" --prefix "$prefix" \
    --device "$device" --frames "$frames" --timeout "$timeout_s" --out "$run/$name.json" \
    >"$fifo" 2>"$run/$name-collect.log" &
  scorer_pid=$!
  exec {ready_fd}<"$fifo"
  if ! read -r -t 60 -u "$ready_fd" line || [ "$line" != subscribed ]; then
    cat "$run/$name-collect.log" >&2
    die "The collector for $name did not subscribe on $broker"
  fi
  exec {ready_fd}<&-
  setsid "$@" >"$run/$name-agent.log" 2>&1 &
  agent_pid=$!
  wait -n -p finished "$scorer_pid" "$agent_pid" || status=$?
  if [ "$finished" = "$agent_pid" ]; then
    agent_pid=""
    tail -n 25 "$run/$name-agent.log" | sed 's/^/  | /' >&2
    die "The $name agent exited (status $status) before $frames predictions arrived; log: $run/$name-agent.log"
  fi
  scorer_pid=""
  if [ "$status" -ne 0 ]; then
    cat "$run/$name-collect.log" >&2
    die "Collecting $frames predictions of $name failed; agent log: $run/$name-agent.log"
  fi
  kill -TERM "$agent_pid"
  timeout 120 tail --pid="$agent_pid" -f /dev/null || die "The $name agent did not stop within 120 s of SIGTERM"
  status=0
  wait "$agent_pid" || status=$?
  agent_pid=""
  [ "$status" -eq 0 ] || die "The $name agent exited with $status after SIGTERM (expected 0); see $run/$name-agent.log"
}

for rt in "${runtimes[@]}"; do
  step "run: $frames frames on x86 with $rt (reference)"
  collect x86 "$rt" "$x86_venv/bin/edgecv-agent" run --config "$run/x86-$rt.toml"
  step "run: $frames frames in the guest with $rt"
  collect arm64 "$rt" "${guest[@]}" "$gvenv/bin/edgecv-agent" run --config "$guest_dir/agent-$rt.toml"
done

step "score"
pairs=()
for rt in "${runtimes[@]}"; do pairs+=(--pair "$rt" "$run/x86-$rt.json" "$run/arm64-$rt.json"); done
score_status=0
"$x86_venv/bin/python" "$here/arm64_score.py" compare --min-accuracy "$min_accuracy" --max-gap "$max_gap" \
  --min-agreement "$min_agreement" "${pairs[@]}" >"$run/score.txt" 2>"$run/score.err" || score_status=$?

qemu_version="$(qemu-aarch64-static --version 2>/dev/null | head -n 1 || echo 'qemu-aarch64 (native)')"
{
  echo
  echo "edgecv arm64 check: $wheel_name"
  echo "guest:   $guest_os, $guest_py, $qemu_version, QEMU_CPU=$cpu"
  echo "install: pip install --only-binary=:all: '${wheel_name}[litert]' into a fresh venv:" \
    "${install_s} s, ${venv_mb} MB"
  echo "wheels resolved in the guest (all prebuilt):"
  echo "$wheels"
  echo "x86 reference: $x86_versions"
  echo
  echo "bench in the guest (emulated: timings are not a Pi's):"
  echo "$bench_table" | sed 's/^/  /'
  echo
  echo "accuracy of $frames synthetic:fashion-mnist frames, predictions received over MQTT on the host:"
  sed 's/^/  /' "$run/score.txt"
} | tee "$run/summary.txt"
if [ "$score_status" -ne 0 ]; then
  cat "$run/score.err" >&2
  die "The arm64 predictions do not match (see above)"
fi
echo "arm64-check: PASSED"
