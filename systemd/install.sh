#!/usr/bin/env bash
# Install (or remove) the edgecv agent as a systemd service on a device (Raspberry Pi OS Bookworm, Debian).
#
#   sudo systemd/install.sh [--runtime onnxruntime|litert|openvino] [--source PATH_OR_SPEC] [--no-start]
#   sudo systemd/install.sh --uninstall [--purge]
#
# Layout: venv /opt/edgecv/venv, the shipped demo bundle and its public key in /opt/edgecv/seed/, config
# /etc/edgecv/agent.toml (written once from agent.example.toml, never overwritten), public keys
# /etc/edgecv/keyring/, broker password /etc/edgecv/mqtt-password (root, 0600, handed to the service with
# LoadCredential=), model store /var/lib/edgecv/models, unit /etc/systemd/system/edgecv-agent.service. Running it
# again changes nothing unless the source or unit changed (that is also how edgecv is upgraded). `--root DIR`
# stages the tree under DIR (no user, no systemctl): for tests and image builds; the venv's scripts then carry DIR.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

root="/"
runtime="onnxruntime"
source_spec="$repo"
python="${PYTHON:-python3}"
pip_args=()
uninstall=0
purge=0
start=1
skip_pip=0
dry_run=0
system_site=0
service_user="edgecv"
unit_name="edgecv-agent.service"

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --root DIR             install under DIR instead of / (no user creation, no systemctl)
  --runtime NAME         onnxruntime (default), litert or openvino (adds that extra; the agent measures every
                         installed runtime on each model and serves the fastest)
  --source PATH_OR_SPEC  what pip installs: a source tree, a wheel or a requirement (default: this repository)
  --python EXE           interpreter for the venv (default python3, must be >= 3.11)
  --pip-args "ARGS"      extra arguments for pip install (e.g. "-c constraints.txt" or "--no-index --find-links DIR")
  --system-site-packages let the venv see apt's Python packages (e.g. python3-picamera2)
  --skip-pip             create the venv but do not pip install edgecv (tests)
  --no-start             enable the service but do not (re)start it
  --uninstall            remove the unit and the venv; keep config and model store
  --purge                with --uninstall: also remove /etc/edgecv, /var/lib/edgecv, /var/cache/edgecv and the user
  --dry-run              print what would be done, change nothing
  -h, --help             this help
EOF
}

die() { echo "install.sh: error: $*" >&2; exit 1; }
note() { echo "install.sh: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="${2:?--root needs a directory}"; shift 2 ;;
    --root=*) root="${1#*=}"; shift ;;
    --runtime) runtime="${2:?--runtime needs onnxruntime, litert or openvino}"; shift 2 ;;
    --runtime=*) runtime="${1#*=}"; shift ;;
    --source) source_spec="${2:?--source needs a path or requirement}"; shift 2 ;;
    --source=*) source_spec="${1#*=}"; shift ;;
    --python) python="${2:?--python needs an executable}"; shift 2 ;;
    --pip-args) read -r -a pip_args <<<"${2-}"; shift 2 ;;
    --system-site-packages) system_site=1; shift ;;
    --skip-pip) skip_pip=1; shift ;;
    --no-start) start=0; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "Unknown option '$1'; see the list above" ;;
  esac
done

case "$runtime" in
  onnxruntime) extra="" ;;
  litert) extra="litert" ;;
  openvino) extra="openvino" ;;
  *) die "Unknown runtime '$runtime': use --runtime onnxruntime, --runtime litert or --runtime openvino" ;;
esac
[ "$purge" -eq 0 ] || [ "$uninstall" -eq 1 ] || die "--purge only goes with --uninstall"

root="${root%/}"
real_root=0
if [ -z "$root" ] || [ "$(cd "$root" 2>/dev/null && pwd -P)" = "/" ]; then
  real_root=1
  root=""
fi
if [ "$real_root" -eq 1 ] && [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  die "Installing into / needs root: run it with sudo (or use --root DIR to stage elsewhere)"
fi

venv="$root/opt/edgecv/venv"
etc="$root/etc/edgecv"
state="$root/var/lib/edgecv"
cache="$root/var/cache/edgecv"
unit_dst="$root/etc/systemd/system/$unit_name"
unit_src="$here/$unit_name"
example="$here/agent.example.toml"

changed=0  # set when the venv or the unit changed: the service is restarted only then

venv_fingerprint() {
  # Every installed file's hash, from the packages' RECORD files: changes with any code change, even at the
  # same version number (a `git pull` of a source tree).
  { cat "$venv"/lib/python3*/site-packages/*.dist-info/RECORD 2>/dev/null || true; } | sha256sum | cut -d' ' -f1
}

systemd_running() { [ "$real_root" -eq 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# Every change goes through run, so --dry-run can show it.
run() {
  if [ "$dry_run" -eq 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# make_dir MODE OWNER:GROUP PATH — owners only apply on a real install (a staged tree has no edgecv user).
make_dir() {
  local mode="$1" owner="$2" path="$3"
  if [ "$real_root" -eq 1 ]; then
    run install -d -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$path"
  elif [ ! -d "$path" ] || [ "$(stat -c %a "$path")" != "${mode#0}" ]; then
    run install -d -m "$mode" "$path"
  fi
}

# put_file SRC DST MODE OWNER:GROUP [keep] — copy only when the content differs (or, with keep, when absent).
put_file() {
  local src="$1" dst="$2" mode="$3" owner="$4" keep="${5:-}"
  if [ -e "$dst" ]; then
    if [ -n "$keep" ]; then note "kept existing $dst"; return 0; fi
    if cmp -s "$src" "$dst" && [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then return 0; fi
  fi
  if [ "$real_root" -eq 1 ]; then
    run install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$src" "$dst"
  else
    run install -m "$mode" "$src" "$dst"
  fi
  note "wrote $dst"
  [ -n "$keep" ] || changed=1  # a first config alone needs no restart
}

uninstall_all() {
  if systemd_running; then
    run systemctl disable --now "$unit_name" || true
  fi
  if [ -e "$unit_dst" ]; then run rm -f "$unit_dst"; note "removed $unit_dst"; fi
  if [ -d "$root/etc/systemd/system/$unit_name.d" ] && [ "$purge" -eq 1 ]; then
    run rm -rf "$root/etc/systemd/system/$unit_name.d"
  fi
  if systemd_running; then run systemctl daemon-reload; fi
  if [ -d "$venv" ]; then run rm -rf "$venv"; note "removed $venv"; fi
  if [ -d "$root/opt/edgecv/seed" ]; then run rm -rf "$root/opt/edgecv/seed"; note "removed $root/opt/edgecv/seed"; fi
  if [ -d "$root/opt/edgecv" ]; then run rmdir "$root/opt/edgecv" 2>/dev/null || true; fi
  if [ "$purge" -eq 1 ]; then
    for d in "$etc" "$state" "$cache"; do
      if [ -e "$d" ]; then run rm -rf "$d"; note "purged $d"; fi
    done
    if [ "$real_root" -eq 1 ] && getent passwd "$service_user" >/dev/null; then
      run userdel "$service_user" || note "could not remove user $service_user; remove it by hand"
    fi
  else
    note "kept $etc (config, keyring, password) and $state (model store); --purge removes them"
  fi
}

if [ "$uninstall" -eq 1 ]; then
  uninstall_all
  exit 0
fi

# --- install -----------------------------------------------------------------------------------------------
[ -f "$unit_src" ] || die "Missing $unit_src: run install.sh from an edgecv source tree"
[ -f "$example" ] || die "Missing $example: run install.sh from an edgecv source tree"
command -v "$python" >/dev/null 2>&1 || die "No '$python' on PATH: install python3 (apt install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || die "edgecv needs Python >= 3.11; '$python' is $("$python" -V 2>&1)"

# 1. The service user (system account, no login, no home of its own beyond the state directory).
if [ "$real_root" -eq 1 ]; then
  if ! getent passwd "$service_user" >/dev/null; then
    run useradd --system --user-group --home-dir /var/lib/edgecv --no-create-home \
      --shell /usr/sbin/nologin --comment "edgecv agent" "$service_user"
    note "created system user $service_user"
  fi
  if getent group video >/dev/null && ! id -nG "$service_user" 2>/dev/null | tr ' ' '\n' | grep -qx video; then
    run usermod -a -G video "$service_user"
  fi
else
  note "staging under $root: not creating user $service_user (happens on the device, with --root /)"
fi

# 2. Directories: config root-owned and readable by the service; state owned by the service.
make_dir 0755 root:root "$root/opt/edgecv"
make_dir 0755 root:root "$root/etc/systemd/system"
make_dir 0750 "root:$service_user" "$etc"
make_dir 0755 root:root "$etc/keyring"
make_dir 0750 "$service_user:$service_user" "$state"
make_dir 0750 "$service_user:$service_user" "$state/models"
make_dir 0750 "$service_user:$service_user" "$cache"

# 3. The venv and edgecv in it.
if [ ! -x "$venv/bin/python" ]; then
  venv_args=()
  [ "$system_site" -eq 0 ] || venv_args+=(--system-site-packages)
  [ "$skip_pip" -eq 0 ] || venv_args+=(--without-pip)
  run "$python" -m venv "${venv_args[@]}" "$venv"
  note "created venv $venv"
  changed=1
fi
if [ "$skip_pip" -eq 0 ]; then
  spec="$source_spec"
  if [ -n "$extra" ]; then
    if [ -e "$source_spec" ]; then
      spec="${source_spec}[$extra]"
    elif [[ "$source_spec" != *"["* ]]; then
      # name[extra] followed by any version specifier: edgecv==0.2.0 -> edgecv[litert]==0.2.0
      spec="$(sed -E "s/^([A-Za-z0-9._-]+)(.*)$/\1[$extra]\2/" <<<"$source_spec")"
    fi
  fi
  if [ "$dry_run" -eq 0 ] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    run "$venv/bin/python" -m ensurepip --upgrade --default-pip >/dev/null  # a venv made with --skip-pip
  fi
  before="$(venv_fingerprint)"
  run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
    --upgrade-strategy only-if-needed "${pip_args[@]}" "$spec"
  if [ "$(venv_fingerprint)" != "$before" ]; then
    changed=1
    note "installed $spec into $venv"
  else
    note "$spec already installed in $venv"
  fi
else
  note "--skip-pip: edgecv not installed into $venv"
fi

# 4. The seed: the shipped demo bundle and the public key that signed it, for a first trial (docs/INSTALL-PI.md).
seed_dir="$root/opt/edgecv/seed"
seed_src=""
if [ "$dry_run" -eq 0 ] && [ -x "$venv/bin/python" ]; then
  seed_src="$("$venv/bin/python" -c 'from edgecv.agent.resources import data_dir; print(data_dir("edgecv.models"))' \
    2>/dev/null || true)"
fi
[ -n "$seed_src" ] || seed_src="$repo/models"  # --skip-pip (or a dry run) from a source tree
make_dir 0755 root:root "$seed_dir"
for f in fashion-mnist.edgecv demo-signing.pub; do
  if [ -f "$seed_src/$f" ]; then
    put_file "$(readlink -f "$seed_src/$f")" "$seed_dir/$f" 0644 root:root
  else
    note "no $f in $seed_src: $seed_dir stays without it"
  fi
done

# 5. Config (never overwritten), broker password placeholder, unit.
fresh_config=0
[ -e "$etc/agent.toml" ] || fresh_config=1
put_file "$example" "$etc/agent.toml" 0640 "root:$service_user" keep
if [ ! -e "$etc/mqtt-password" ]; then
  run install -m 0600 /dev/null "$etc/mqtt-password"
  note "created empty $etc/mqtt-password (root-only): put the broker password there if the broker needs one"
fi
put_file "$unit_src" "$unit_dst" 0644 root:root

# 6. systemd.
if systemd_running; then
  run systemctl daemon-reload
  run systemctl enable "$unit_name"
  if [ "$start" -eq 1 ] && [ "$fresh_config" -eq 1 ]; then
    note "enabled $unit_name; not started: edit $etc/agent.toml (device_id, broker, camera, model) first, then"
    note "  systemctl start edgecv-agent"
  elif [ "$start" -eq 1 ] && [ "$changed" -eq 1 ]; then
    run systemctl restart "$unit_name"
    note "(re)started $unit_name: journalctl -u edgecv-agent -f"
  elif [ "$start" -eq 1 ]; then
    run systemctl start "$unit_name"  # nothing changed: only make sure it runs
    note "$unit_name unchanged and running"
  else
    note "enabled $unit_name (not started): systemctl start edgecv-agent"
  fi
elif [ "$real_root" -eq 1 ]; then
  note "systemd is not running here: enable it later with systemctl enable --now $unit_name"
fi
note "done"
