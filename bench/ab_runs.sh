#!/bin/bash
# A/B for a change that must not change results (a refactor): trains nine small runs
# (MLP and conv at np 1 and 2, stream loader, recorded-step replay, the skip policy, a
# mid-epoch resume) with one binary; run it for the binary before and after the change into
# the SAME OUTROOT (move the first tree aside), then bench/ab_compare.py BEFORE AFTER.
# usage: bench/ab_runs.sh ELBO OUTROOT DATA(with train/ test/ from elbo-shard) configs/smoke.yaml
set -u
ELBO=$1; OUT=$2; DATA=$3; SPEC=$4
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
rm -rf "$OUT"; mkdir -p "$OUT"
CONV="model={type: conv, latent: 8, likelihood: bernoulli, encoder: [{type: conv2d, channels: 8, kernel: 4, stride: 2, padding: 1}, relu, {type: group_norm, groups: 4}, flatten], decoder: [{type: linear, features: 392}, relu, {type: reshape, shape: [8, 7, 7]}, {type: conv_transpose2d, channels: 4, kernel: 4, stride: 2, padding: 1}, relu, {type: conv_transpose2d, channels: 1, kernel: 4, stride: 2, padding: 1}]}"
COMMON=(--set device=cpu --set data.train=$DATA/train --set data.test=$DATA/test --set data.max_samples=500
        --set train.batch_size=48 --set train.epochs=2 --set train.log_every=5 --set checkpoint.every=7
        --set checkpoint.keep=0 --set eval.every=10 --set eval.max_samples=200 --set eval.iw_samples=2
        --set eval.batch_size=250)
run() {  # tag np extra...
  local tag=$1 np=$2; shift 2
  mpirun -np $np "$ELBO" train "$SPEC" "${COMMON[@]}" --set output.dir=$OUT/$tag "$@" > $OUT/$tag.log 2> $OUT/$tag.err
  echo "$tag rc=$?" | tee -a $OUT/rc.txt
}
run mlp_np1 1
run mlp_np2 2
run conv_np1 1 --set "$CONV"
run conv_np2 2 --set "$CONV"
run mlp_np2_stream 2 --set data.loader=stream --set data.shuffle=blocks --set data.cache_mb=1
run mlp_np2_graph 2 --set train.cuda_graph=on --set loss.kl_warmup_steps=6
run mlp_np2_skip 2 --set optim.lr=1e6 --set optim.grad_clip=0 --set train.on_nonfinite=skip --set train.max_consecutive_skips=100 --set train.max_skip_fraction=1
# resume: 10 steps, then continue to the end from the newest checkpoint (mid-epoch, at step 7)
run mlp_np2_part 2 --set train.max_steps=10
cp -r $OUT/mlp_np2_part $OUT/mlp_np2_resumed
rm -f $OUT/mlp_np2_resumed/model.h5 $OUT/mlp_np2_resumed/checkpoints/ckpt-*10*.h5
mpirun -np 2 "$ELBO" train "$SPEC" "${COMMON[@]}" --set output.dir=$OUT/mlp_np2_resumed --resume auto > $OUT/mlp_np2_resumed.log 2> $OUT/mlp_np2_resumed.err
echo "mlp_np2_resumed rc=$?" | tee -a $OUT/rc.txt
