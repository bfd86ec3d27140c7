#!/usr/bin/env bash
# A coverage-guided fuzz campaign of one bolero target, with libFuzzer, on
# the stable toolchain:
#
#   scripts/fuzz.sh <package> <test-file> <target> [runs] [libfuzzer args...]
#   scripts/fuzz.sh braid-store store_fuzz protocol_frames_from_bytes 10000000
#
# It does what `cargo bolero test --engine libfuzzer --sanitizer NONE` does,
# for one test file only: cargo-bolero builds every test of the package with
# coverage instrumentation, and the ones without bolero (and the package's
# binaries) then fail to link libFuzzer's hooks. Here they are never built
# (`--test`), and the binaries the test depends on link with the hooks left
# unresolved (they are never run). The corpus and crashes go to
# $CARGO_TARGET_DIR (default target)/fuzz/<target>/. Extra arguments go to
# libFuzzer.
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
package=$1 test=$2 target=$3 runs=${4:-10000000}
shift $(($# < 4 ? $# : 4))

root=$(cd "$(dirname "$0")/.." && pwd)
triple=$(rustc -vV | sed -n 's/^host: //p')
tdir=${CARGO_TARGET_DIR:-$root/target}
work=$tdir/fuzz/$target
mkdir -p "$work/corpus" "$work/crashes"

flags="--cfg fuzzing --cfg fuzzing_libfuzzer -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-sanitizer-coverage-stack-depth \
 -Clink-arg=-Wl,--unresolved-symbols=ignore-all"

exe=$(cd "$root" && RUSTFLAGS="$flags" cargo test --profile fuzz --target "$triple" \
    --target-dir "$tdir/fuzz/build" -p "$package" --test "$test" --no-run \
    --message-format json 2>/dev/null |
    grep '"kind":\["test"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
if [ -z "$exe" ]; then
    echo "building $package --test $test failed; rerun without --message-format to see why" >&2
    exit 1
fi

export BOLERO_TEST_NAME=$target BOLERO_LIBTEST_HARNESS=1
# bolero splits these on single spaces: no doubled or trailing ones.
args=("$work/corpus" "$work/crashes" "-artifact_prefix=$work/crashes/" "-runs=$runs"
    -max_len=4096 -print_final_stats=1 "$@")
export BOLERO_LIBFUZZER_ARGS="${args[*]}"
exec "$exe" "$target" --exact --nocapture --quiet --test-threads 1
