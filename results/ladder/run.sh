#!/usr/bin/env bash
# bash results/ladder/run.sh sweep RUNG | confirm RUNG LR_LINEAR LR_MPI
# (sweep: LRS=a,b,c and ROUTERS=linear|mpi narrow the default grid, e.g. for cpu-1.7m's per-router lrs)
#
# The scale ladder's grids (results/ladder/PLAN.md): every rung trains 1 token per active
# non-embedding parameter, 8 sequences per step, warmup 10% of the steps, fp32, and is run as two
# processes of one thread each on the same folder (compare skips a run the other process holds).
# Rerunning a stage resumes it: finished runs are skipped, interrupted ones continue from their
# checkpoints.
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=${1:?sweep or confirm}; rung=${2:?rung}
case $rung in  # preset: steps, warmup, eval-every (steps = N_active_non_embedding / tokens per step)
  debug)    steps=162;  warmup=16;  every=20;  seeds=300,301,302,303,304,305,306,307,308,309,310,311,312,313,314,315,316,317,318,319 ;;
  cpu-440k) steps=435;  warmup=44;  every=50;  seeds=300,301,302,303,304,305,306,307,308,309,310,311 ;;
  tiny)     steps=1029; warmup=103; every=100; seeds=300,301,302,303,304,305,306,307,308,309 ;;
  cpu-1.7m) steps=1627; warmup=163; every=160; seeds=300,301,302,303,304,305,306,307,308,309 ;;
  *) echo "run.sh: unknown rung $rung" >&2; exit 2 ;;
esac
common=(--preset "$rung" --steps $steps --batch-size 8 --warmup-steps $warmup --eval-every $every
        --eval-batches 16 --optimizers adamw --scales 1 --no-progress)
two() {  # the same compare call in two one-thread processes; fails, after both end, if either failed
  OMP_NUM_THREADS=1 mpirouter compare "$@" & a=$!
  sleep 5; OMP_NUM_THREADS=1 mpirouter compare "$@" & b=$!
  rc=0; wait $a || rc=$?; wait $b || rc=$?
  return $rc
}
case $stage in
  sweep)
    lrs=${LRS:-0.003,0.006,0.012,0.024}; routers=${ROUTERS:-linear,mpi}  # cpu-1.7m: one call per router
    two --routers $routers --seeds 1000,1001 --lr "$lrs" --vary model.moe.balance=bias --out results/ladder/$rung/sweep "${common[@]}" ;;
  confirm)
    lr_linear=${3:?lr of linear}; lr_mpi=${4:?lr of mpi}
    zoo=""; case $rung in debug|cpu-440k) zoo=",linear+erc" ;; esac
    # linear+erc runs at linear's lr (the plan); one call per (lr, cell)
    for cell in bias aux; do
      routers=linear; [[ $cell == bias ]] && routers=linear$zoo
      if [[ $lr_linear == "$lr_mpi" ]]; then
        two --routers $routers,mpi --seeds $seeds --lr $lr_linear --vary model.moe.balance=$cell --out results/ladder/$rung/confirm "${common[@]}"
      else
        two --routers $routers --seeds $seeds --lr $lr_linear --vary model.moe.balance=$cell --out results/ladder/$rung/confirm "${common[@]}"
        two --routers mpi --seeds $seeds --lr $lr_mpi --vary model.moe.balance=$cell --out results/ladder/$rung/confirm "${common[@]}"
      fi
    done ;;
  *) echo "run.sh: unknown stage $stage" >&2; exit 2 ;;
esac
