#!/usr/bin/env bash
# On the GPU machine (after `bash scripts/gpu-bundle.sh`; carry .gpux, `tar xJf .gpux/bundle.tar.xz`):
# the one-pass stem kernel (the default; KESTREL_STEM_CONV=0 turns it off) against the unfused stem,
# gelan-c at 640 in FP16 and INT8, batches 1 and 8, same card, same run, with layer profiles
# (bench/knob-ab.sh does the runs). Writes $OUT/stem-conv.json and $OUT/stem-conv-{off,on}-P.*.
# Runs before 2026-11-28T19:50 wrote $OUT/stem{0,1}-P.* and named the engines unfused/stem_kernel.
#   OUT=$OUT bash bench/stem-conv.sh
exec bash "$(dirname "$0")/knob-ab.sh" stem-conv KESTREL_STEM_CONV
