"""The TOPD training loop, top to bottom (DESIGN section 3):

    rollout (SGLang student servers) -> teacher + student scoring (vocab-parallel l_t)
    -> candidates, near-future windows (SGLang teacher + student servers), OT divergence, weights, guidance rows
    -> teacher forward on guidance rows -> TOPD loss, backward, optimizer step (Megatron pipeline schedule)
    -> weight sync to the student servers -> metrics, checkpoint

Every rank runs this function (torchrun / srun / the test harness). Global rank 0 owns the SGLang servers; the first
TP rank of each data-parallel replica's first pipeline stage asks them for near-future windows.
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_topd import parallel
from megatron_topd.config import Config, load_config, save_config
from megatron_topd.models import ModelSpec, build_gpt_model, padded_vocab_size
from megatron_topd.train import batches as mb
from megatron_topd.train.checkpoint import latest_step, load_checkpoint, load_model_weights, save_checkpoint, unwrap
from megatron_topd.train.metrics import MetricsLogger
from megatron_topd.train.objective import ObjectiveScales, make_loss_fn
from megatron_topd.train.optim import build_optimizer, wrap_ddp
from megatron_topd.train.scoring import student_token_loss, teacher_logits
from megatron_topd.train.step import train_step


def _spec(explicit: ModelSpec | None, checkpoint: str, who: str) -> ModelSpec:
    if explicit is not None:
        return explicit
    path = Path(checkpoint) / "model_spec.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{who}: no model spec given and {path} does not exist; set the spec in the config "
                                "or point the checkpoint at a tools/convert_hf_to_megatron.py output")
    return ModelSpec.load_yaml(path)


def _broadcast(obj, src: int = 0, group=None):
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class Rollouts:
    """Rank 0's SGLang side: student servers (rollouts, student windows) and the teacher's server (teacher windows)."""

    def __init__(self, cfg: Config):
        from megatron_topd.rollout import ServerGroup

        self.student_cfg = cfg.rollout
        self.teacher_cfg = replace(copy.deepcopy(cfg.rollout), model_path=cfg.teacher.hf_path, num_servers=1, ports=[],
                                   urls=[])
        self.student = ServerGroup.from_config(self.student_cfg) if not cfg.rollout.urls else None
        self.teacher = ServerGroup.from_config(self.teacher_cfg)

    def start(self) -> tuple[list[str], list[str]]:
        """Spawn every server at once and wait for all (start-ups overlap); returns (student urls, teacher urls)."""
        from megatron_topd.rollout import ServerGroup

        own = (self.student.servers if self.student is not None else []) + self.teacher.servers
        self.all = ServerGroup(own).start()
        student_urls = self.student.urls if self.student is not None else list(self.student_cfg.urls)
        return student_urls, self.teacher.urls

    def stop(self) -> None:
        if getattr(self, "all", None) is not None:
            self.all.stop()


def train(cfg: Config) -> list[dict]:
    """Run `cfg.train.steps` TOPD steps; returns the per-step metrics (on every rank)."""
    from megatron.core import parallel_state as ps

    from megatron_topd.convert import export_hf_weights
    from megatron_topd.rollout import SamplingParams, SGLangClient
    from megatron_topd.rollout.prompts import PromptDataset
    from megatron_topd.rollout.records import records_from_generations, write_records
    from megatron_topd.rollout.weight_sync import make_weight_sync
    from megatron_topd.topd import embedding_lookup, run_probe

    cfg.validate()
    if cfg.teacher.placement != "colocated":
        raise NotImplementedError("teacher.placement=remote is not wired into the training loop yet: use colocated")
    layout = parallel.initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                                 backend=cfg.parallel.backend, seed=cfg.train.seed)
    rank0 = dist.get_rank() == 0
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    # --- models: the student (trained) and the co-located teacher (frozen, same TP/PP layout) ---
    student_spec = _spec(cfg.student, cfg.train.student_checkpoint, "student")
    teacher_spec = _spec(cfg.teacher_spec, cfg.teacher.checkpoint, "teacher")
    if student_spec.vocab_size != teacher_spec.vocab_size:
        raise ValueError(f"student vocab_size {student_spec.vocab_size} != teacher vocab_size {teacher_spec.vocab_size}: "
                         "on-policy distillation scores the student's tokens with the teacher, so both need one tokenizer")
    vocab = student_spec.vocab_size
    student = [wrap_ddp(build_gpt_model(student_spec, precision=cfg.precision))]
    optimizer, scheduler = build_optimizer(student, cfg.optim, params_dtype=cfg.precision.torch_dtype,
                                           total_steps=cfg.train.steps)
    teacher = [build_gpt_model(teacher_spec, precision=cfg.precision)]
    teacher[0].requires_grad_(False)
    teacher[0].eval()
    load_model_weights(Path(cfg.teacher.checkpoint) / _ckpt_step_dir(cfg.teacher.checkpoint), teacher)

    # --- data: prompts (resumable position), tokenizer from the student's HF folder ---
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.train.student_hf_path)
    if AutoTokenizer.from_pretrained(cfg.teacher.hf_path).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the teacher's tokenizer ({cfg.teacher.hf_path}) differs from the student's "
                         f"({cfg.train.student_hf_path}): token ids would mean different strings; distil between "
                         "models of one tokenizer family")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = PromptDataset(cfg.train.prompts_path, tokenizer, n_samples=cfg.rollout.n_samples, seed=cfg.train.seed,
                            chat_template=bool(getattr(tokenizer, "chat_template", None)))

    start_step = 0
    if latest_step(ckpt_root) is not None:
        info = load_checkpoint(ckpt_root, student, optimizer, scheduler)
        start_step = info["step"]
        dataset.load_state_dict(info["extra"]["dataset"])
    else:
        load_model_weights(Path(cfg.train.student_checkpoint) / _ckpt_step_dir(cfg.train.student_checkpoint), student)

    # --- SGLang: rank 0 starts the servers; every rank that probes gets a client ---
    rollouts = Rollouts(cfg) if rank0 else None
    try:
        urls = _broadcast(rollouts.start() if rank0 else None)
        student_client = SGLangClient(urls[0], vocab_size=vocab, request_timeout_s=cfg.rollout.request_timeout_s,
                                      max_retries=cfg.rollout.max_retries, progress=False)
        teacher_client = SGLangClient(urls[1], vocab_size=vocab, request_timeout_s=cfg.rollout.request_timeout_s,
                                      max_retries=cfg.rollout.max_retries, progress=False)
        sync_cfg = replace(cfg.rollout, model_path=cfg.train.student_hf_path)
        weight_sync = make_weight_sync(sync_cfg, urls[0])
        if start_step > 0:  # servers start from the initial HF weights: bring them to the resumed student
            weight_sync.sync(export_hf_weights(student[0], student_spec), version=str(start_step))

        logger = MetricsLogger(out, enabled=rank0, total_steps=cfg.train.steps, start_step=start_step,
                               wandb_project=cfg.train.wandb_project, config=cfg)
        history = []
        for step in range(start_step, cfg.train.steps):
            t0 = time.perf_counter()
            timings = {}

            # 1. rollouts from the student's servers (rank 0), shared with every rank
            if rank0:
                prompts = dataset.next_batch(cfg.train.prompts_per_step)
                gens = student_client.generate(
                    [p.ids for p in prompts],
                    SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, n=cfg.rollout.n_samples,
                                   temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                   seed=cfg.train.seed * 100003 + step),
                )
                records = records_from_generations([p.index for p in prompts], [p.ids for p in prompts], gens)
                write_records(out / "rollouts" / f"step_{step:08d}.jsonl", records, vocab_size=vocab)
                payload = ([r.prompt_ids for r in records], [r.response_ids for r in records],
                           sorted({r.weight_version for r in records}), dataset.state_dict())
            else:
                payload = None
            prompt_ids, response_ids, versions, dataset_state = _broadcast(payload)
            timings["rollout_s"] = time.perf_counter() - t0

            # 2. this DP replica's share, packed into fixed-length microbatches
            share = _dp_share(len(prompt_ids), layout)
            tokens, response_mask = mb.rollout_tensors([prompt_ids[i] for i in share], [response_ids[i] for i in share],
                                                       mb.round_up(max(len(prompt_ids[i]) + len(response_ids[i])
                                                                       for i in range(len(prompt_ids)))), pad_id)
            score_batches = mb.split_microbatches({"tokens": tokens, "response_mask": response_mask},
                                                  cfg.train.micro_batch_size, "rollout")

            # 3. scoring: teacher logit shards, student per-token reverse KL (vocab-parallel, no grad)
            t1 = time.perf_counter()
            t_logits = teacher_logits(teacher, score_batches)
            token_loss = student_token_loss(student, score_batches, t_logits, vocab_size=vocab,
                                            chunk_size=cfg.train.loss_chunk_size)
            token_loss = _to_first_stage(token_loss, tokens.shape, layout)
            timings["score_s"] = time.perf_counter() - t1

            # 4-6. candidates -> near-future windows -> OT divergence -> weights (+ guidance rows for topd)
            t2 = time.perf_counter()
            probe = None
            if layout.is_first_stage:
                emb = unwrap(student[0] if cfg.topd.embedding_source == "student" else teacher[0])
                word = emb.embedding.word_embeddings
                probe_tp_rank0 = ps.get_tensor_model_parallel_rank() == 0
                probe = run_probe(
                    tokens, token_loss, response_mask, cfg.topd,
                    teacher=teacher_client if probe_tp_rank0 else None,
                    student=student_client if probe_tp_rank0 else None,
                    embed=embedding_lookup(word.weight.detach(), group=parallel.tensor_parallel_group(),
                                           vocab_start=word.vocab_start_index,
                                           vocab_size=padded_vocab_size(vocab, layout.tensor_parallel)),
                    pad_id=pad_id, seed=cfg.train.seed * 7919 + step, group=parallel.tensor_parallel_group(),
                )
                probe_payload = _probe_payload(probe)
            else:
                probe_payload = None
            probe_payload = _broadcast(probe_payload, src=ps.get_pipeline_model_parallel_first_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
            timings["probe_s"] = time.perf_counter() - t2

            # 7. the training pass: rollout microbatches (+ guidance microbatches)
            t3 = time.perf_counter()
            guidance = probe_payload["guidance"]
            seq = tokens.shape[1] if guidance is None else mb.round_up(max(tokens.shape[1], guidance["tokens"].shape[1]))
            train_batches = mb.split_microbatches(
                {"tokens": mb.pad_to(tokens, seq, pad_id), "response_mask": mb.pad_to(response_mask, seq, False),
                 "token_weights": mb.pad_to(probe_payload["token_weights"], seq, 0.0)},
                cfg.train.micro_batch_size, "rollout")
            # The scoring pass already holds the teacher's rollout logits: pad them to `seq` (the padded positions are
            # masked out of the loss) and run the teacher only on the guidance rows.
            train_teacher = None if t_logits is None else [
                torch.nn.functional.pad(t, (0, 0, 0, seq - t.shape[1])) for t in t_logits]
            n_windows = 0
            if guidance is not None and guidance["tokens"].shape[0] > 0:
                n_windows = guidance["tokens"].shape[0]
                guidance_batches = mb.split_microbatches(
                    {"tokens": mb.pad_to(guidance["tokens"], seq, pad_id),
                     "logit_weights": mb.pad_to(guidance["logit_weights"], seq, 0.0)},
                    cfg.train.micro_batch_size, "guidance")
                guidance_teacher = teacher_logits(teacher, guidance_batches)
                if train_teacher is not None:
                    train_teacher += guidance_teacher
                train_batches += guidance_batches
            counts = torch.tensor([float(response_mask.sum()), float(n_windows)], dtype=torch.float64,
                                  device=parallel.device())
            dist.all_reduce(counts, group=ps.get_data_parallel_group())
            counts = counts.cpu()
            scales = ObjectiveScales(num_microbatches=len(train_batches), dp_size=layout.data_parallel,
                                     global_tokens=int(counts[0]), global_windows=int(counts[1]),
                                     lambda_traj=cfg.topd.lambda_traj if cfg.topd.variant == "topd" else 0.0,
                                     variant=cfg.topd.variant)
            result = train_step(student, optimizer, scheduler, train_batches,
                                make_loss_fn(train_teacher, scales, vocab_size=vocab, chunk_size=cfg.train.loss_chunk_size))
            timings["train_s"] = time.perf_counter() - t3

            # 8. weight sync: the student's servers now sample from the updated policy
            t4 = time.perf_counter()
            sync_stats = weight_sync.sync(export_hf_weights(student[0], student_spec), version=str(step + 1))
            timings["sync_s"] = time.perf_counter() - t4

            # 9. metrics and checkpoint
            metrics = {"loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr, **result.metrics,
                       **_probe_metrics(probe_payload), **timings, "step_s": time.perf_counter() - t0,
                       "response_tokens": float(counts[0]), "guidance_windows": float(counts[1]),
                       "rollout_weight_version": float(versions[-1]) if versions[-1].isdigit() else -1.0}
            if sync_stats is not None:
                metrics["sync_mb"] = sync_stats.num_bytes / 2**20
            history.append(metrics)
            logger.log(step + 1, metrics)
            if (step + 1) % cfg.train.save_interval == 0 or step + 1 == cfg.train.steps:
                save_checkpoint(ckpt_root, step + 1, student, optimizer, scheduler, extra={"dataset": dataset_state})
        logger.close()
        weight_sync.close()
        return history
    finally:
        if rollouts is not None:
            rollouts.stop()


def _ckpt_step_dir(root: str) -> str:
    step = latest_step(root)
    if step is None:
        raise FileNotFoundError(f"{root} holds no checkpoint (no latest_step.txt): convert the HF model with "
                                "tools/convert_hf_to_megatron.py first")
    return f"step_{step:08d}"


def _dp_share(n: int, layout) -> list[int]:
    if n % layout.data_parallel:
        raise ValueError(f"{n} rollouts do not split over data_parallel={layout.data_parallel}: make "
                         "train.prompts_per_step * rollout.n_samples a multiple of the data-parallel size")
    per = n // layout.data_parallel
    return list(range(layout.dp_rank * per, (layout.dp_rank + 1) * per))


def _to_first_stage(per_microbatch: list[torch.Tensor] | None, shape, layout) -> torch.Tensor:
    """Concatenate the last stage's per-microbatch l_t and hand it to every pipeline stage (shape is known)."""
    from megatron.core import parallel_state as ps

    full = torch.zeros(shape, dtype=torch.float32, device=parallel.device())
    if per_microbatch is not None:
        full = torch.cat(per_microbatch)[: shape[0]].float().to(full.device)
    if layout.pipeline_parallel > 1:
        dist.broadcast(full, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return full.cpu()


def _probe_payload(probe) -> dict:
    g = probe.guidance
    return {
        "token_weights": probe.token_weights.float().cpu(),
        "guidance": None if g is None else {"tokens": g.tokens.cpu(), "logit_weights": g.logit_weights.float().cpu()},
        "n_candidates": int(probe.divergent.numel()),
        "n_divergent": int(probe.divergent.sum()),
        "ot_sum": float(probe.ot_distances.double().sum()) if probe.ot_distances.numel() else 0.0,
    }


def _probe_metrics(p: dict) -> dict:
    """The paper's diagnostics, summed over data-parallel replicas."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([p["n_candidates"], p["n_divergent"], p["ot_sum"]], dtype=torch.float64, device=parallel.device())
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    n, div, ot_sum = t.cpu().tolist()
    return {"candidates": n, "divergent": div, "low_divergence_share": (n - div) / n if n else 0.0,
            "mean_ot_distance": ot_sum / n if n else 0.0}


def main(command: str, config_path: str | None, overrides: list[str]) -> int:
    if command == "demo":
        from megatron_topd import demo

        return demo.main(config_path, overrides)
    train(load_config(config_path, overrides))
    parallel.destroy()
    return 0
