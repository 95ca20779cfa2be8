#!/usr/bin/env bash
# Builds the Gangway container image without pulling a base image.
#
# The root file system is assembled here from a built `gangway` binary and exactly the shared
# libraries it links (found with ldd, the dynamic loader included), then `docker import`ed. Nothing
# is downloaded, so it works on machines that can reach no registry, and the image holds only the
# binary, its libraries and two small tools for tasks: no package manager, no curl (health checks
# run `gangway health`).
#
# What goes in:
#   /usr/local/bin/gangway     the binary (debug info stripped unless --no-strip); server, worker,
#                              CLI (and the per-task supervisor, `gangway task-shim`)
#   /usr/local/bin/gangway-shim  the small per-task supervisor the worker prefers, when it was
#                              built beside the binary (cargo build --bin gangway-shim)
#   /bin/<tool>                small programs for tasks, with their libraries (default: sh, sleep,
#                              so the compose demo and the end-to-end test have a command to run)
#   /lib*, /usr/lib*           the libraries ldd lists, at the paths the loader looks them up
#   /etc/passwd, group         root and the unprivileged user `gangway` (uid/gid 10001)
#   /etc/nsswitch.conf         names from /etc/hosts, then DNS (Docker's service names)
#   /etc/gangway/              where a server config is mounted; tls/ (owned by gangway) where
#                              the compose file's certificate volume goes
#   /var/lib/gangway           data (owned by gangway, so a fresh named volume is too), with
#                              checkpoints/ in it: where a worker's shared checkpoint volume goes
#                              (a volume mounted at a path the image lacks would belong to root)
#   /tmp                       mode 1777
# No CA certificates: Gangway speaks plain gRPC today.
#
# Real GPUs: run the worker with the NVIDIA container runtime (`--gpus all`), which mounts
# libnvidia-ml into the container; the image does not carry it.
#
# The image is labelled with a hash of its inputs (binary, this script, the tools); when the tag
# already carries that label, nothing is rebuilt. `{hash}` in --tag is replaced by that hash.
#
# usage: deploy/image/build-image.sh [--binary PATH] [--tag TAG] [--tools "sh sleep"] [--no-strip]
#                                     [--label KEY=VALUE (no spaces)]...
# The last line on stdout is the tag.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

die() {
    echo "build-image: $*" >&2
    exit 1
}

binary="${CARGO_TARGET_DIR:-$HOME/.cache/gangway/target}/debug/gangway"
tag="gangway:dev"
tools="sh sleep"
strip=1
uid=10001
labels=()

while [ $# -gt 0 ]; do
    case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    --tools) tools="${2?--tools needs a list (may be empty)}"; shift 2 ;;
    --no-strip) strip=0; shift ;;
    --label) labels+=("${2:?--label needs KEY=VALUE}"); shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done

for cmd in docker ldd tar sha256sum; do
    command -v "$cmd" >/dev/null || die "needs $cmd on PATH"
done
[ -f "$binary" ] && [ -x "$binary" ] || die "--binary $binary: not an executable file (build it first: cargo build --bin gangway)"

# The tools' real files (sh is a link to dash on Debian).
tool_files=()
for t in $tools; do
    path="$(command -v "$t")" || die "--tools: $t is not on PATH"
    tool_files+=("$(readlink -f "$path")")
done

shim="$(dirname "$binary")/gangway-shim"
[ -f "$shim" ] && [ -x "$shim" ] || shim=""

script="${BASH_SOURCE[0]}"
hash="$(
    {
        sha256sum "$binary" $shim "$script" | cut -d' ' -f1
        echo "strip=$strip uid=$uid tools=$tools labels=${labels[*]+${labels[*]}}"
        for f in ${tool_files[@]+"${tool_files[@]}"}; do sha256sum "$f"; done
    } | sha256sum | cut -c1-16
)"
tag="${tag//\{hash\}/$hash}"

have="$(docker image inspect --format '{{ index .Config.Labels "org.gangway.content-hash" }}' "$tag" 2>/dev/null || true)"
if [ "$have" = "$hash" ]; then
    echo "build-image: $tag is up to date (inputs $hash)" >&2
    echo "$tag"
    exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/gangway-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"

install -d -m 0755 "$root"/{bin,etc/gangway,usr/local/bin,var/lib}
install -d -m 1777 "$root/tmp"
install -d -m 0750 "$root/var/lib/gangway" "$root/var/lib/gangway/checkpoints" "$root/etc/gangway/tls"

if [ "$strip" = 1 ] && command -v objcopy >/dev/null; then
    objcopy --strip-debug "$binary" "$root/usr/local/bin/gangway"
else
    cp "$binary" "$root/usr/local/bin/gangway"
fi
chmod 0755 "$root/usr/local/bin/gangway"
elves=("$binary")
if [ -n "$shim" ]; then
    if [ "$strip" = 1 ] && command -v objcopy >/dev/null; then
        objcopy --strip-debug "$shim" "$root/usr/local/bin/gangway-shim"
    else
        cp "$shim" "$root/usr/local/bin/gangway-shim"
    fi
    chmod 0755 "$root/usr/local/bin/gangway-shim"
    elves+=("$shim")
fi

i=0
for t in $tools; do
    cp "${tool_files[$i]}" "$root/bin/$t"
    chmod 0755 "$root/bin/$t"
    elves+=("${tool_files[$i]}")
    i=$((i + 1))
done

# Every library ldd lists (`name => /path (addr)`, or the loader as `/path (addr)`), copied with
# links resolved to the path it is listed under. A statically linked program lists none.
for elf in "${elves[@]}"; do
    listing="$(ldd "$elf" 2>&1)" || listing=""
    while read -r line; do
        case "$line" in
        *"not found"*) die "$elf: a library is missing on this machine: $line" ;;
        *"=> /"*) lib="${line#*=> }" ;;
        /*) lib="$line" ;;
        *) continue ;;
        esac
        lib="${lib%% (*}"
        if [ ! -e "$root$lib" ]; then
            install -d -m 0755 "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        fi
    done <<<"$listing"
done

cat >"$root/etc/passwd" <<EOF
root:x:0:0:root:/root:/usr/sbin/nologin
gangway:x:$uid:$uid:Gangway:/var/lib/gangway:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
cat >"$root/etc/group" <<EOF
root:x:0:
gangway:x:$uid:
nogroup:x:65534:
EOF
cat >"$root/etc/nsswitch.conf" <<EOF
passwd: files
group: files
hosts: files dns
EOF

# Everything root-owned, then the data directories owned by gangway (tar sets owners per run, not
# per file, so they are appended in a second run; no root or fakeroot needed to build).
tarball="$work/rootfs.tar"
tar -C "$root" --sort=name --numeric-owner --owner=0 --group=0 \
    --exclude=./var/lib/gangway --exclude=./etc/gangway/tls -cf "$tarball" .
tar -C "$root" --numeric-owner --owner="$uid" --group="$uid" --no-recursion \
    -rf "$tarball" ./var/lib/gangway ./var/lib/gangway/checkpoints ./etc/gangway/tls

# The image the tag names now, if any: removed below once the tag moves, unless a container uses it.
previous="$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
size="$(du -sh "$root" | cut -f1)"
echo "build-image: importing $size root file system as $tag (inputs $hash)" >&2
changes=()
for l in ${labels[@]+"${labels[@]}"}; do changes+=(--change "LABEL $l"); done
docker import \
    --change 'ENTRYPOINT ["/usr/local/bin/gangway"]' \
    --change 'CMD ["--help"]' \
    --change "USER $uid:$uid" \
    --change 'WORKDIR /var/lib/gangway' \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
    --change 'EXPOSE 7101 8101 7300' \
    --change "LABEL org.gangway.content-hash=$hash" \
    --change 'LABEL org.opencontainers.image.title=gangway' \
    ${changes[@]+"${changes[@]}"} \
    --message "assembled by deploy/image/build-image.sh from $(basename "$binary")" \
    "$tarball" "$tag" >/dev/null
if [ -n "$previous" ]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
fi
echo "$tag"
