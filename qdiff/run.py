"""One run: load -> calibration data -> quantize -> reconstruct -> (deploy) -> sample -> evaluate -> report.

``run(cfg)`` returns ``(metrics, objects)``. Each stage is one call into its package; every setting is
validated (:func:`qdiff.spec.build_spec`, :func:`qdiff.spec.check_inputs`) before the first stage starts,
and each stage's wall time and peak memory are recorded.
"""
from __future__ import annotations

from dataclasses import asdict

from qdiff.spec import RunSpec, build_spec, check_inputs, run_prompts
from qdiff.tracking import NullTracker


def run(cfg, tracker: NullTracker | None = None) -> tuple[dict, dict]:
    """Run the whole pipeline for a composed config; returns (metrics, objects)."""
    import qdiff
    from qdiff.calib import collect_calibration
    from qdiff.models import load_model
    from qdiff.models.base import fingerprint
    from qdiff.deploy import export
    from qdiff.deploy.stage import deploy
    from qdiff.report.run import run_metrics, write_run
    from qdiff.runstatus import refuse_finished
    from qdiff.runtime import Stages, deterministic_kernels, seed_everything, tune_allocator
    from qdiff.stages.evaluate import evaluate
    from qdiff.stages.sample import sample

    tune_allocator()
    spec = build_spec(cfg)
    tracker = tracker or NullTracker()
    refuse_finished(spec.output_dir, requeued_ok=False)  # the CLI returns a requeued job's finished result itself
    pre = check_inputs(spec)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(spec.seed)
    if spec.deterministic:
        deterministic_kernels()
    st, extra, calib = Stages(spec.device), {}, None

    with st("load"):
        model = load_model(spec.model).to(spec.device)
        model.meta.setdefault("fingerprint", fingerprint(model.unet))
        real = model.real_images() if model.real_images is not None and spec.eval.fid else None
    prompts = run_prompts(model, spec, spec.eval.n_samples, spec.seed)

    unet = model.unet
    if spec.quant.enabled:
        with st("calib_data"):
            n_prompts = spec.calib.n if spec.calib.mode == "uniform" else spec.calib.N
            calib, hit = collect_calibration(model, spec.sampler, spec.calib, spec.cache_dir, spec.device,
                                             run_prompts(model, spec, n_prompts, spec.calib.seed))
        extra["calibration"] = {"N": len(calib), "entries": calib.n_entries, "cache_hit": hit, "key": calib.meta["key"],
                                **{k: getattr(spec.calib, k) for k in ("T", "c", "n", "mode")}}

        with st("quantize"):  # quantize + reconstruct: the public API, one way to quantize
            unet = qdiff.quantize(model.unet, spec.quant, calib, spec.recon, device=spec.device,
                                  work_dir=recon_dir(spec, calib, model), logger=tracker.lightning_logger())
        st.split("quantize", unet.qdiff_report["seconds"])
        # the run owns its folder (a finished run is refused above): a requeued job replaces its own earlier export
        extra["artifact"] = export(unet, spec.output_dir / "quantized_unet", extra=artifact_facts(model), overwrite=True)
        extra.update(quant_summary(unet))

    deployed = variants = None
    if spec.deploy.enabled:  # the exported artifact, loaded back with a backend (and timed with deploy.timing)
        with st("deploy"):
            deployed, variants, extra["deploy"] = deploy(model, unet, spec.output_dir / "quantized_unet", spec)

    with st("sample"):  # every sample set the run needs: its own, the FP reference, the artifact's, the figure's
        sets = sample(model, unet, spec, prompts, calib, deployed, variants)

    with st("evaluate"):  # scores and figures from those sets; no model runs here
        scores, evaluated, features = evaluate(model, sets, spec, prompts, real, pre, tracker)
        if "deploy" in evaluated:
            extra["deploy"].update(evaluated.pop("deploy"))  # its FID/IS and error next to the stage's sizes/timings

    metrics = run_metrics(spec, model, scores, {**extra, **evaluated}, st.summary())
    write_run(spec.output_dir, sets.samples, features, spec, metrics, tracker)
    return metrics, {"spec": spec, "model": model, "calib": calib, "qunet": unet, "samples": sets.samples}


def recon_dir(spec: RunSpec, calib, model):
    """The reconstruction's checkpoint folder in the shared cache, keyed by what determines its result (the
    folder itself records the full key, so a stale or foreign one is refused, never mixed)."""
    if spec.quant.method != "qdiff":
        return None
    from qdiff.cache import content_key

    ident = {"weights": model.meta["fingerprint"], "calib": calib.meta["key"], "quant": asdict(spec.quant),
             "recon": spec.recon.result_settings(),
             "device": spec.device.type}
    return spec.cache_dir / "recon" / content_key(ident)


def artifact_facts(model) -> dict:
    """What a sampler needs besides the network, kept with the deployable artifact."""
    return {"model": model.name, "fingerprint": model.meta["fingerprint"], "scheduler_config": model.scheduler_config,
            "sample_shape": list(model.sample_shape)}


def quant_summary(qunet) -> dict:
    """Counts of the per-layer table, and the reconstruction report when there was one."""
    from collections import Counter

    from qdiff.quant.wrap import conditioning_layers

    specs = qunet.quant_specs
    cond = conditioning_layers(qunet)
    out = {"quant_layers": {
        "n_layers": len(specs), "n_split_layers": sum(1 for s in specs if s.split),
        "conditioning_path": {"n_layers": len(cond), "bits": dict(Counter(f"W{s.weight_bits}A{s.act_bits}"
                                                                          for s in specs if s.name in cond))},
        "split_layers": {s.name: s.split for s in specs if s.split},
        "weight_bits_hist": dict(Counter(str(s.weight_bits) for s in specs)),
        "act_bits_hist": dict(Counter(str(s.act_bits) for s in specs))}}
    out["sanity_check"] = qunet.qdiff_report.get("sanity")  # the quantized model vs FP on calibration inputs
    report = {k: v for k, v in qunet.qdiff_report.items() if k not in ("seconds", "sanity")}
    if report:
        out["reconstruction"] = report
    return out
