#!/bin/bash
# How tests/data/old_release was made (tests/test_ablation.py::test_work_of_earlier_releases_stays_usable).
#
# ablation/: an ablation root started and finished by release 7d7cdb5 (before issue 13: its
#   cells' cell.json has no --config.train.validate_at_end=False, and its EMANet checkpoint
#   records no model.freeze_unit_conv_in, which did not exist yet). One EMANet cell, 2 steps of a
#   smaller tiny model: 24k parameters, a 680 KB checkpoint, most of it orbax's per-array
#   metadata. TensorBoard events, train.log and the lock record are left out.
# cell_6de883d.json: the cell.json release 6de883d writes for the same command (it records
#   --config.train.validate_at_end=False among the cell's arguments).
#
# Run from a checkout of the current release: bash tests/data/old_release/make.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
OUT=$REPO/tests/data/old_release
WORK=$(mktemp -d)
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 TFDS_DATA_DIR=$WORK/tfds
ARGS=(--config tests/tiny.py --emanet model.num_iters=2 --t_eval 2
      --config.train.num_steps=2 --config.train.log_every=1 --config.eval.max_batches=1
      --config.model.base_width=2 --config.model.head_channels=8
      --config.model.head_mid_channels=8)
for commit in 7d7cdb5 6de883d; do
  mkdir -p "$WORK/$commit" && git -C "$REPO" archive "$commit" | tar -x -C "$WORK/$commit"
  (cd "$WORK/$commit" && PYTHONPATH=$PWD "$REPO/.venv/bin/python" -m hemnet_jax.studies.ablation \
     --root "$WORK/root_$commit" "${ARGS[@]}")
done
rm -rf "$OUT/ablation" && mkdir -p "$OUT/ablation"
CELL=emanet_num_iters=2
cp -r "$WORK/root_7d7cdb5/$CELL" "$OUT/ablation/"
rm -f "$OUT/ablation/$CELL"/events.out.tfevents.* "$OUT/ablation/$CELL"/train.{log,lock}
cp "$WORK/root_6de883d/$CELL/cell.json" "$OUT/cell_6de883d.json"
rm -rf "$WORK"
du -sh "$OUT"
