#!/usr/bin/env bash
# Rebuild everything that ships beside the embedded tiny model, in order:
# the model, its CPU latency profile, its outcome tables (RL train / val / test) and its accuracy report.
# Usage: bash scripts/build_embedded.sh   (a trained model can be reused: SKIP_TRAIN=1, its profile SKIP_PROFILE=1; extra training
# flags for every stage, e.g. --device cuda, go in TRAIN_ARGS)
set -euo pipefail
cd "$(dirname "$0")/.."
W=envs/vlm/weights/tiny
if [ -z "${SKIP_TRAIN:-}" ]; then
  # The shipped model's lineage, one resumable stage per line, each starting from the one before
  # (1-10, 12-15 and runs 21-26 on this 2-core CPU, 11 on a lent H100): 1. VQA loss only (its LLM is kept); 2. ViT and connector restarted with
  # the dense vision loss, 600 vision-only steps on task scenes; 3. 1500 vision-only steps on packed
  # dense scenes; 4. joint training, dense scenes kept in the vision loss; 5.-15. see below. (The shipped run of stage 4
  # was changed while it ran: its first 550 steps used the earlier four-letter glyph family and its
  # first 750 steps had no --dense-aux-batch; this line is the recipe as it ended.)
  stage() {  # stage OUT ARGS...: train unless OUT/model exists (a half-finished stage resumes)
    local out=$1; shift
    # shellcheck disable=SC2086
    [ -f "$out/model/model.safetensors" ] || python scripts/train_vlm.py --out "$out" "$@" ${TRAIN_ARGS:-}
  }
  stage runs/tiny_vlm --steps 1200 --full-steps 500 --aux-weight 0
  stage runs/tiny_vlm_aux --init runs/tiny_vlm/model --reinit-vision --steps 2600 --vision-steps 600 --full-steps 900
  stage runs/tiny_vlm_dense_warmup --init runs/tiny_vlm_aux/model --steps 1500 --vision-steps 1500 \
    --warmup-scenes dense --tier-weights 1 1 2 --val-every 250 --val-n 50 --ranking-n 32
  stage runs/tiny_vlm_joint --init runs/tiny_vlm_dense_warmup/model --steps 1800 --full-steps 600 --val-every 300 --val-n 150 \
    --dense-aux-batch 8
  # 5. the answer-position norm cap and complementary question pairs (README: why presence, glyph and
  # sum were stuck). Changed while it ran: steps 0-300 hard pairs without the cap, 300-550 easy pairs,
  # 550-750 cap 50, then cap 20; the schedule was 1500 steps until step 1050, then 2200.
  stage runs/tiny_vlm_pairs --init runs/tiny_vlm_joint/model --steps 2200 --full-steps 300 --lr 1e-3 --warmup 50 \
    --val-every 300 --val-n 150 --dense-aux-batch 8 --complement-pairs easy --norm-cap 20
  # 6. SynthVQA version 3 (16 px capital letters): 450 vision-only steps on dense scenes, then joint steps
  # weighted towards glyph, sum and the high tier. The shipped run was stopped at step 1100 by hand;
  # stage 7 started from that checkpoint's float32 weights (this line saves them in float16).
  stage runs/tiny_vlm_caps --init runs/tiny_vlm_pairs/model --steps 1500 --stop-at 1100 --vision-steps 450 \
    --warmup-scenes dense --full-steps 0 --lr 7e-4 --warmup 50 --val-every 350 --val-n 150 --dense-aux-batch 8 \
    --complement-pairs easy --norm-cap 20 --family-weights 0.5 1 3 1 1.5 --tier-weights 0.6 1 1.4
  # 7. glyph-focused: mostly glyph questions at the high tier, smaller batches, the full config half the time.
  stage runs/tiny_vlm_glyphfocus --init runs/tiny_vlm_caps/model --steps 900 --batch-size 16 --full-steps 0 \
    --p-full 0.5 --lr 7e-4 --warmup 30 --val-every 300 --val-n 150 --dense-aux-batch 4 --complement-pairs easy \
    --norm-cap 20 --family-weights 0.3 0.5 6 0.5 0.7 --tier-weights 0.2 0.3 2
  # 8. a mixed recipe again (presence, glyph and sum weighted, the high tier favoured), a lower learning rate.
  stage runs/tiny_vlm_mix8 --init runs/tiny_vlm_glyphfocus/model --steps 1000 --batch-size 16 --full-steps 0 \
    --p-full 0.5 --lr 5e-4 --warmup 30 --val-every 250 --val-n 150 --dense-aux-batch 4 --complement-pairs easy \
    --norm-cap 20 --family-weights 0.4 2.5 3 1 2 --tier-weights 0.4 0.8 1.6 --seed 8
  # 9. the same recipe, count and sum weighted more, a lower learning rate again; stopped at step 1000 of
  # the 1500-step schedule (the shipped run was interrupted at step 93 and resumed from its step-50 checkpoint).
  stage runs/tiny_vlm_mix9 --init runs/tiny_vlm_mix8/model --steps 1500 --stop-at 1000 --batch-size 16 --full-steps 0 \
    --p-full 0.5 --lr 4e-4 --warmup 30 --val-every 500 --val-n 150 --dense-aux-batch 4 --complement-pairs easy \
    --norm-cap 20 --family-weights 0.4 3 2.5 1 2.5 --tier-weights 0.4 0.8 1.6 --seed 9
  # 10. the same recipe at learning rate 3e-4, the first stage that continues the vision probe of the
  # run before it (stages 3-9 each started it afresh: loss about 14, random gradients into the ViT).
  stage runs/tiny_vlm_mix10 --init runs/tiny_vlm_mix9/model --steps 1000 --batch-size 16 --full-steps 0 \
    --p-full 0.5 --lr 3e-4 --warmup 30 --val-every 500 --val-n 150 --dense-aux-batch 4 --complement-pairs easy \
    --norm-cap 20 --family-weights 0.4 3 2.5 1 2.5 --tier-weights 0.4 0.8 1.6 --seed 10 --ship "$W"
  # 11. on a lent H100 from the shipped stage 10, batch 32; no probe was shipped beside it, so the fresh probe
  # reads detached vision tokens for 100 steps. The run had --max-minutes 6.42 and stopped at step 804 of
  # the 1000-step schedule (2.1 steps/s); --stop-at 804 repeats it.
  # Without a GPU, TRAIN_ARGS="--device cpu" (it comes last, so it wins). --ship writes probe.pt beside
  # the model since then: remove stage 10's so the probe starts afresh, as in the shipped run.
  [ -f runs/tiny_vlm_mix11/model/model.safetensors ] || rm -f "$W/probe.pt"
  stage runs/tiny_vlm_mix11 --init "$W" --device cuda --steps 1000 --stop-at 804 --batch-size 32 --full-steps 0 \
    --p-full 0.5 --lr 3e-4 --warmup 30 --probe-warmup 100 --val-every 250 --val-n 150 --ckpt-every 250 \
    --dense-aux-batch 4 --complement-pairs easy --norm-cap 20 --family-weights 0.4 3 2.5 1 2.5 \
    --tier-weights 0.4 0.8 1.6 --seed 11 --ship "$W"
  # 12. on this 2-core CPU from stage 11 (continuing its probe): batches of 16 over a full 2400-step schedule
  # (68 min), count and sum weighted more (family weights 0.3 / 3 / 2.5 / 1.5 / 3).
  stage runs/tiny_vlm_mix12 --init runs/tiny_vlm_mix11/model --device cpu --steps 2400 --batch-size 16 --full-steps 0 \
    --p-full 0.5 --lr 3e-4 --warmup 30 --val-every 800 --val-n 150 --ckpt-every 100 --dense-aux-batch 4 \
    --complement-pairs easy --norm-cap 20 --family-weights 0.3 3 2.5 1.5 3 --tier-weights 0.4 0.8 1.6 --seed 12
  # 13. the stage-12 recipe with count weighted more, 2400 steps. (The run started from stage 12 as shipped,
  # the same float16 weights and probe that runs/tiny_vlm_mix12/model holds; "$W" would be stage 15 by now.)
  stage runs/tiny_vlm_mix13 --init runs/tiny_vlm_mix12/model --device cpu --steps 2400 --max-minutes 70 --batch-size 16 --full-steps 0 \
    --p-full 0.5 --lr 3e-4 --warmup 30 --val-every 800 --val-n 150 --ckpt-every 100 --dense-aux-batch 4 \
    --complement-pairs easy --norm-cap 20 --family-weights 0.3 2.5 2.5 2 3 --tier-weights 0.4 0.8 1.6 --seed 13
  # 14. attribute pairs (a presence question's partner asks the colour of a small shape: presence had
  # matched the shape alone), the full config on 75% of batches, presence weighted more; 1800 steps (57 min).
  stage runs/tiny_vlm_mix14 --init runs/tiny_vlm_mix13/model --device cpu --steps 1800 --max-minutes 78 --batch-size 16 \
    --full-steps 0 --p-full 0.75 --lr 3e-4 --warmup 30 --val-every 900 --val-n 150 --ckpt-every 100 --dense-aux-batch 4 \
    --complement-pairs attribute --norm-cap 20 --family-weights 0.3 3 2.5 2 3 --tier-weights 0.4 0.8 1.6 --seed 21
  # 15. colour and the low tier weighted back up (stage 14 lost colour at the low tier), lr 2.5e-4, 1500 steps.
  stage runs/tiny_vlm_mix15 --init runs/tiny_vlm_mix14/model --device cpu --steps 1500 --max-minutes 62 --batch-size 16 \
    --full-steps 0 --p-full 0.7 --lr 2.5e-4 --warmup 30 --val-every 750 --val-n 150 --ckpt-every 100 --dense-aux-batch 4 \
    --complement-pairs attribute --norm-cap 20 --family-weights 0.8 3 2.5 2 3 --tier-weights 0.7 0.8 1.6 --seed 22
  # Runs 21, 24, 25 and 26 (the README's names; runs 16-20, 22 and 23 were not kept): presence. Stage 15
  # answered "is there a small red circle?" from the shape alone. One guide per step of the lookup: run 21,
  # layer 2 attends to the small objects of the asked shape (--attn-*) and names their colour (--read-weight);
  # run 24, layer 1 attends to the question's colour word (--ask-*) and layer 3 matches it (--match-*);
  # run 25, the asked colour carried to the answer position (--carry-*), layer 2 asked for the answer
  # (--early-weight); run 26, that answer weighted up and layer 2's MoE MLP at 10x the learning rate
  # (--boost-*). Each 30-37 min on this CPU. Run 21 started from stage 15 as shipped then.
  guided=(--device cpu --batch-size 16 --lr 2.5e-4 --warmup 30 --p-full 0.7 --full-steps 0 --val-n 150
    --dense-aux-batch 4 --complement-pairs recolour --norm-cap 20 --tier-weights 0.7 0.8 1.6
    --family-weights 0.8 3 2.5 2 3 --attn-weight 0.3 --attn-families presence --attn-presence shape --read-weight 0.5)
  stage runs/exp_read21 --init runs/tiny_vlm_mix15/model --steps 1100 --max-minutes 44 --seed 28 --val-every 550 "${guided[@]}"
  stage runs/exp_match24 --init runs/exp_read21/model --steps 900 --max-minutes 34 --seed 31 --val-every 450 "${guided[@]}" \
    --ask-weight 0.3 --match-weight 0.3
  stage runs/exp_carry25 --init runs/exp_match24/model --steps 1100 --max-minutes 40 --seed 33 --val-every 550 "${guided[@]}" \
    --early-weight 0.3 --ask-weight 0.3 --carry-weight 0.5
  stage runs/exp_boost26 --init runs/exp_carry25/model --steps 1000 --max-minutes 36 --seed 34 --val-every 500 "${guided[@]}" \
    --early-weight 1.0 --ask-weight 0.3 --carry-weight 0.5 --boost-layers 2 --boost-scale 10 --ship "$W"
fi
# Latency depends on shapes, not weights: a profile timed on a quiet machine can be kept for retrained
# weights (SKIP_PROFILE=1); a busy moment inflates every stage (stage 8 kept stage 7's 67.7 ms profile:
# this machine timed the same request at 97-113 ms for either model while it was busy).
[ -n "${SKIP_PROFILE:-}" ] || python scripts/profile_latency.py --model tiny --device cpu --out "$W/latency_cpu.json"
mkdir -p "$W/outcomes"
# shards run as Ray tasks, one per core; an interrupted build resumes. Tables of other weights in
# runs/outcomes are refused (they record a hash of the weights): move them away when the model changed.
for spec in "test 2 2000" "rl_train 4 600" "val 1 1000"; do
  set -- $spec
  python scripts/build_outcomes.py --model tiny --seed "$2" --n "$3" --executor ray --out "runs/outcomes/$1"
done
for split in train val test; do
  src=runs/outcomes/$([ "$split" = train ] && echo rl_train || echo "$split")
  cp "$src/table.npz" "$W/outcomes/$split.npz"
  cp "$src/pareto.png" "reports/pareto_tiny_$split.png"
done
python scripts/eval_vlm.py --model tiny --seed 2 --n 2000 --outcomes runs/outcomes/test --out reports/tiny_eval_seed2.json
