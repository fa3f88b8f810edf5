"""Mutation spot-check: plausible bugs put into the server one at a time; do the tests catch them?

Each mutation replaces one exact piece of source in a temporary copy of the working tree,
then runs the tests that should notice, against that copy. A mutant is *caught* when
those tests fail; *missed* means the suite would let that bug through. A mutation whose
source text is gone (the code was changed) is reported as *stale*: update its text.

    .venv/bin/python bench/mutants.py            # every mutation (about an hour on 2 cores)
    .venv/bin/python bench/mutants.py -k auth    # the ones whose name contains "auth"

Not part of CI: it runs the same tests many times. Run it after changing the critical
modules (store, auth, gate, rpc, names, formats, batching, registry, oip_tensors, cache) and
keep every mutant caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = "server/modelhost/server/"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "batching: outputs split by rows without checking they can be",
        SERVER + "batching.py",
        "if any(t.dim() == 0 or t.shape[0] != total for t in outputs.values()):",
        "if False:",
        ("tests/test_batching.py::test_detection_model_answers_concurrent_callers",),
    ),
    Mutant(
        "batching: an error outside the model call escapes the batch (the lane dies)",
        SERVER + "batching.py",
        "                    try:\n                        then()\n"
        "                    except Exception as error:\n"
        "                        self._fail_group(group, error)",
        "                    then()",
        ("tests/test_batching.py::test_lane_keeps_serving_after_an_unexpected_error",),
    ),
    Mutant(
        "batching: a GPU lane finishes a batch before it launches the next (no pipelining)",
        SERVER + "batching.py",
        "                launched = self._safely(task)\n"
        "                if in_flight is not None:\n"
        "                    self._safely(in_flight)\n"
        "                in_flight = launched",
        "                if in_flight is not None:\n"
        "                    self._safely(in_flight)\n"
        "                in_flight = self._safely(task)",
        ("tests/test_batching.py::test_an_asynchronous_runner_is_pipelined",),
    ),
    Mutant(
        "models: a load's record write and registration are not ordered with others'",
        SERVER + "models.py",
        "        key = (hosted.name, hosted.version)\n        async with self._commits:",
        "        key = (hosted.name, hosted.version)\n        if True:",
        ("tests/test_restore.py::test_concurrent_loads_and_unloads_are_recorded_as_they_happened",),
    ),
    Mutant(
        "batching: a batch filling up holds the shared lane from other models",
        SERVER + "batching.py",
        "                or self._lane.busy_elsewhere(self)\n",
        "",
        (
            "tests/test_batching.py::"
            "test_a_long_queue_delay_does_not_hold_the_shared_lane_from_other_models",
        ),
    ),
    Mutant(
        "models: a whole warm-up is one job on the shared lane",
        SERVER + "models.py",
        "            on_lane=lambda run: lane.call(run).result(),\n"
        "            first_here=compiles_here,\n"
        "        )",
        "            first_here=compiles_here,\n"
        "        ) if False else lane.call(\n"
        "            lambda: runner.warm_up(request.warmup_shape, measure=measure)\n"
        "        ).result()",
        (
            "tests/test_batching.py::"
            "test_a_warm_up_on_the_shared_lane_lets_other_models_run_between_its_runs",
        ),
    ),
    Mutant(
        "cache: a page-in runs after every request for it has passed its deadline",
        SERVER + "cache.py",
        "        if time.monotonic() >= until:\n",
        "        if False:\n",
        ("tests/test_cache.py::test_a_page_in_nobody_waits_for_any_more_is_skipped",),
    ),
    Mutant(
        "auth: RepositoryModelLoad leaves the management tier",
        SERVER + "auth.py",
        '"/inference.GRPCInferenceService/RepositoryModelLoad": MANAGEMENT,',
        '"/inference.GRPCInferenceService/RepositoryModelLoad": INFERENCE,',
        ("tests/test_security.py::test_every_rpc_checks_its_token_tier",),
    ),
    Mutant(
        "auth: an inference token passes a management RPC",
        SERVER + "auth.py",
        "if tier == MANAGEMENT and self.management:",
        "if tier == MANAGEMENT and not self.management:",
        ("tests/test_security.py",),
    ),
    Mutant(
        "auth: an empty token file turns authentication off",
        SERVER + "auth.py",
        "    if not found:\n",
        "    if not found and False:\n",
        ("tests/test_security.py",),
    ),
    Mutant(
        "gate: silent callers keep their slots (no read timeout)",
        SERVER + "gate.py",
        "            async with asyncio.timeout(self.read_timeout):\n"
        "                data = await anext(messages)",
        "            async with asyncio.timeout(None):\n"
        "                data = await anext(messages)",
        ("tests/test_gate.py::test_silent_callers_cannot_hold_the_slots",),
    ),
    Mutant(
        "rpc: DeadlineExpired loses its row in the status table",
        SERVER + "rpc.py",
        "    e.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,\n",
        "",
        ("tests/test_rpc.py",),
    ),
    Mutant(
        "store: the manifest entry is not fsynced before its rename",
        SERVER + "store_files.py",
        "            file.flush()\n            os.fsync(file.fileno())\n",
        "            file.flush()\n",
        ("tests/test_store_faults.py",),
    ),
    Mutant(
        "store: the manifest entry is written before the blob is renamed into place",
        SERVER + "store.py",
        "            if fresh:\n                os.replace(pending.path, blob)\n",
        "            self._write_entry(entry, record)\n"
        "            if fresh:\n                os.replace(pending.path, blob)\n",
        ("tests/test_store_faults.py",),
    ),
    Mutant(
        "store: the upload is not fsynced before it becomes a blob",
        SERVER + "staged_writer.py",
        "            os.fsync(self._fd)",
        "            pass",
        ("tests/test_store_faults.py",),
    ),
    Mutant(
        "hosted: an unload does not wait for the requests holding a version",
        SERVER + "hosted.py",
        "            if not self._leases:\n                return\n            event",
        "            if True:\n                return\n            event",
        ("tests/test_batching.py::test_unload_waits_for_requests_that_hold_the_version",),
    ),
    Mutant(
        "names: '..' allowed in names",
        SERVER + "names.py",
        'if ".." in name or not _NAME.fullmatch(name):',
        "if not _NAME.fullmatch(name):",
        ("tests/test_errors.py", "tests/test_store.py"),
    ),
    Mutant(
        "formats: torch.load without weights_only",
        SERVER + "formats.py",
        'return torch.load(path, map_location="cpu", weights_only=True, mmap=True)',
        'return torch.load(path, map_location="cpu", weights_only=False, mmap=True)',
        ("tests/test_errors.py",),
    ),
    Mutant(
        "upload: the announced sha256 is not compared",
        SERVER + "checkpoints.py",
        "if wanted and wanted != pending.sha256:",
        "if False:",
        ("tests/test_fuzz.py::test_fuzz_save_checkpoint",),
    ),
    Mutant(
        "oip: INT8 typed contents read as unsigned",
        SERVER + "oip_tensors.py",
        '"INT8": ("int_contents", "<i1"),',
        '"INT8": ("int_contents", "<u1"),',
        ("tests/test_oip.py",),
    ),
    Mutant(
        "cache: a version with requests in flight or queued is evicted",
        SERVER + "hosted.py",
        "        held = self._leases > self._parked or self._compiles\n",
        "        held = self._compiles\n",
        ("tests/test_cache.py::test_busy_versions_are_not_evicted_and_a_deadline_ends_the_wait",),
    ),
    Mutant(
        "architectures: a build may make any number of tensors",
        SERVER + "architectures.py",
        "            if self.made > MAX_BUILD_TENSORS:",
        "            if False:",
        ("tests/test_hostile_round3.py::test_arguments_that_build_a_million_layers_are_refused",),
    ),
    Mutant(
        "architectures: a builder that needs tensor values is built for real on the CPU",
        SERVER + "architectures.py",
        "            [_Skeleton(small_on_cpu=False), _Skeleton(small_on_cpu=True)]",
        '            [_Skeleton(small_on_cpu=False), torch.device("cpu")]',
        (
            "tests/test_hostile_round3.py::"
            "test_a_model_that_cannot_be_built_on_the_meta_device_allocates_no_weights",
        ),
    ),
    Mutant(
        "loading: what a partial checkpoint lacks is initialised differently at every build",
        SERVER + "loading.py",
        "            torch.manual_seed(_seed(spec, record))",
        "            torch.manual_seed(time.time_ns())",
        (
            "tests/test_hostile_round3.py::"
            "test_what_a_partial_checkpoint_lacks_is_the_same_after_a_page_in_and_a_restart",
        ),
    ),
    Mutant(
        "loading: what a partial checkpoint lacks is seeded the same for any bytes",
        SERVER + "loading.py",
        "            torch.manual_seed(_seed(spec, record))",
        "            torch.manual_seed(0)",
        (
            "tests/test_hostile_round3.py::"
            "test_the_same_missing_layers_differ_between_different_weights",
        ),
    ),
    Mutant(
        "store: a state document too big to read back is written",
        SERVER + "store.py",
        "            if len(data) > MAX_STATE_BYTES:  # the next start could not read it back",
        "            if False:",
        (
            "tests/test_hostile_round3.py::"
            "test_a_load_that_would_outgrow_the_restore_record_is_refused",
        ),
    ),
    Mutant(
        "auth: of two authorization headers the first decides",
        SERVER + "auth.py",
        "    if len(headers) != 1:",
        "    if not headers:",
        ("tests/test_hostile_round3.py::test_two_authorization_headers_are_refused",),
    ),
    Mutant(
        "cache: weights are copied to the host tier with the cache's lock held",
        SERVER + "cache.py",
        "            self._cond.release()\n            copy = None\n            try:\n"
        "                copy = self._copy_to_host(hosted, module, pin)\n            finally:\n"
        "                del module\n                self._cond.acquire()\n",
        "            copy = None\n            try:\n"
        "                copy = self._copy_to_host(hosted, module, pin)\n            finally:\n"
        "                del module\n",
        (
            "tests/test_cache_host_tier.py::test_weights_are_copied_to_the_host_outside_the_cache_lock",
        ),
    ),
    Mutant(
        "cache: a page-in does not wait for its version's copy to the host tier to finish",
        SERVER + "cache.py",
        "            move.done.wait()",
        "            pass",
        (
            "tests/test_cache_host_tier.py::test_weights_are_copied_to_the_host_outside_the_cache_lock",
        ),
    ),
    Mutant(
        "cache: the most recently used version is evicted first",
        SERVER + "cache.py",
        "            key=lambda h: h.used_order,\n        )\n\n    def _evict_one(",
        "            key=lambda h: -h.used_order,\n        )\n\n    def _evict_one(",
        ("tests/test_cache.py::test_least_recently_used_versions_leave_and_page_back_in",),
    ),
    Mutant(
        "cache: pinned versions are evicted like the others",
        SERVER + "cache.py",
        "if not h.stays and (h.name, h.version) != exclude",
        "if (h.name, h.version) != exclude",
        ("tests/test_cache.py::test_pinned_versions_stay_and_alone_cannot_overflow",),
    ),
    Mutant(
        "formats: zip archives opened without looking at their central directory",
        "client/modelhost/client/archives.py",
        "    expanded = sum(entry.file_size for entry in found_entries)\n"
        "    if expanded > size + SLACK:",
        "    expanded = 0\n    if expanded > size + SLACK:",
        (
            "tests/test_checkpoint_bombs.py::test_a_bomb_upload_is_refused_before_anything_is_inflated",
        ),
    ),
    Mutant(
        "checkpoints: an upload's announced size checked only at the end",
        SERVER + "checkpoints.py",
        "await self._spool(_at_most(chunks, expected), pending, keep)",
        "await self._spool(chunks, pending, keep)",
        ("tests/test_checkpoint_bombs.py::test_an_upload_past_its_announced_size_fails_at_once",),
    ),
    Mutant(
        "store: the holds of other servers sharing the store are ignored",
        SERVER + "store.py",
        "        for held in self._holds.held_elsewhere().values():\n",
        "        for held in ():\n",
        (
            "tests/test_shared_store_holds.py::"
            "test_an_overwrite_through_another_server_keeps_the_evicted_versions_bytes",
        ),
    ),
    Mutant(
        "devices: any CUDA error counts as a failed device (a request can take health down)",
        SERVER + "devices.py",
        "    if cuda and any(sticky.lower() in lowered for sticky in STICKY_CUDA_ERRORS):\n"
        "        return True",
        "    if cuda:\n        return True",
        ("tests/test_device_memory.py::test_a_cuda_error_that_is_not_sticky_fails_only_that_call",),
    ),
    Mutant(
        "batching: a GPU lane is made anew for every version (cuBLAS workspaces pile up)",
        SERVER + "batching.py",
        "            if len(lanes) < self._size and all(lanes.values()):",
        "            if True:",
        ("tests/test_batching.py::test_a_device_lane_pool_shares_a_bounded_number_of_lanes",),
    ),
    Mutant(
        "host tier: every tensor placed with contiguous strides (channels_last lost)",
        SERVER + "host_tier.py",
        '    strides = torch.empty_like(like, device="meta").stride()',
        '    strides = torch.empty(like.shape, device="meta").stride()',
        (
            "tests/test_host_tier.py::"
            "test_weights_become_aligned_views_of_one_buffer_and_answer_the_same",
        ),
    ),
    Mutant(
        "models: a restored version counts its checkpoint file, not its weights",
        SERVER + "models.py",
        "            device_bytes=nbytes,",
        "            device_bytes=record.size_bytes if record else 0,",
        (
            "tests/test_cache.py::test_a_restored_version_reserves_its_weights_not_its_checkpoint_file",
        ),
    ),
    Mutant(
        "metrics: an unloaded version's series stay",
        SERVER + "models.py",
        "            self._metrics.forget_version(hosted.name, hosted.version)",
        "            pass",
        ("tests/test_operations.py::test_prometheus_metrics",),
    ),
    Mutant(
        "cache: a request whose version was unloaded during its page-in runs on no module",
        SERVER + "cache.py",
        "            if hosted.tier != RESIDENT:\n                raise VersionUnloaded(",
        "            if False:\n                raise VersionUnloaded(",
        (
            "tests/test_cache.py::"
            "test_a_version_unloaded_while_its_page_in_waits_answers_unavailable",
        ),
    ),
    Mutant(
        "rpc: a failed call's error keeps the frames it came through (its request)",
        SERVER + "rpc.py",
        "            _drop_tracebacks(error)\n",
        "",
        ("tests/test_leaks.py::test_large_requests_are_freed_when_their_calls_end",),
    ),
    Mutant(
        "gate: gRPC's request iterator left open when a call ends (it holds the body)",
        SERVER + "gate.py",
        "            await requests.aclose()",
        "            pass",
        ("tests/test_leaks.py::test_large_requests_are_freed_when_their_calls_end",),
    ),
    Mutant(
        "gate: a reply stream waits for its caller forever",
        SERVER + "gate.py",
        "                    async with asyncio.timeout(self.read_timeout):\n"
        "                        await context.write(message)",
        "                    async with asyncio.timeout(None):\n"
        "                        await context.write(message)",
        ("tests/test_stalled_streams.py::test_a_download_nobody_reads_ends_and_frees_its_slot",),
    ),
    Mutant(
        "request_limits: entries counted only by the fast reader (protobuf parses a million)",
        SERVER + "request_limits.py",
        "        return request or parse_unusual(data)",
        "        return request or pb.PredictRequest.FromString(data)",
        ("tests/test_entry_limits.py::test_a_million_entries_are_refused_before_they_are_parsed",),
    ),
    Mutant(
        "archives: the directory taken wherever zipfile finds it (two directories pass)",
        "client/modelhost/client/archives.py",
        "    if found != offset:",
        "    if False:",
        ("tests/test_checkpoint_bombs.py::test_an_archive_with_two_directories_is_refused",),
    ),
    Mutant(
        "wire: fields inside a group are walked but not counted",
        "client/modelhost/client/wire.py",
        "            if ALL_FIELDS in counts:",
        "            if ALL_FIELDS in counts and not groups:",
        ("tests/test_entry_limits.py::test_filler_fields_are_bounded_before_they_are_parsed",),
    ),
    Mutant(
        "inference: requests of a compiled version compile on the lane (new shapes stall it)",
        SERVER + "inference.py",
        "self._compiling if self._cuda_graphs else _run_only(module)",
        "self._compiling",
        (
            "tests/test_compiled.py::"
            "test_a_new_shape_runs_uncompiled_at_once_and_compiles_on_the_compile_thread",
        ),
    ),
    Mutant(
        "inference: a new shape is never compiled after the warm-up",
        SERVER + "inference.py",
        "            self._compiled.add(key)\n"
        "            full = len(self._compiled) == MAX_COMPILED_SHAPES\n"
        "        self._submit_compile(key)\n",
        "            self._compiled.add(key)\n"
        "            full = len(self._compiled) == MAX_COMPILED_SHAPES\n",
        (
            "tests/test_compiled.py::test_without_warmup_shape_the_first_requests_compile_in_the_background",
        ),
    ),
    Mutant(
        "inference: no bound on the shapes a compiled version compiles for",
        SERVER + "inference.py",
        "if key in self._compiled or len(self._compiled) >= MAX_COMPILED_SHAPES:",
        "if key in self._compiled:",
        ("tests/test_compiled.py::test_new_shapes_past_the_limit_stay_uncompiled",),
    ),
    Mutant(
        "inference: warm-up runs do not compile",
        SERVER + "inference.py",
        "self._timed_run, (rows, *shape[1:]), dtype, compile=not run",
        "self._timed_run, (rows, *shape[1:]), dtype, compile=False",
        ("tests/test_compiled.py::test_warm_up_shapes_run_compiled_code_and_any_row_count_does",),
    ),
    Mutant(
        "load_checks: a LoadModel refuses no warmup_shape of too many dimensions",
        SERVER + "load_checks.py",
        "if len(request.warmup_shape) > codec.MAX_RANK:",
        "if False:",
        (
            "tests/test_hostile_round4.py::"
            "test_a_warmup_shape_of_more_dimensions_than_a_tensor_may_have_is_refused",
        ),
    ),
    Mutant(
        "architectures: detection arguments used at every Predict are not checked",
        SERVER + "architectures.py",
        "            check_detection_args(self.name, args)\n",
        "            pass\n",
        (
            "tests/test_hostile_round4.py::test_detection_arguments_used_at_every_predict_are_bounded",
        ),
    ),
    Mutant(
        "probes: health Watch streams are not counted",
        SERVER + "probes.py",
        "        async with self.streams.held(context):\n"
        "            await super().Watch(request, context)",
        "        await super().Watch(request, context)",
        ("tests/test_hostile_round4.py::test_open_health_watch_and_reflection_streams_are_capped",),
    ),
    Mutant(
        "inference: compiles keep TorchDynamo's default 8 graphs per model class",
        SERVER + "inference.py",
        "            config.recompile_limit = RECOMPILE_LIMIT\n",
        "            pass\n",
        ("tests/test_compiled.py::test_a_model_class_keeps_more_graphs_than_torchs_default",),
    ),
    Mutant(
        "inference: callers' shapes may spend every graph of a model class",
        SERVER + "inference.py",
        "            if not _class_may_compile(self._code):\n                return\n",
        "",
        (
            "tests/test_compiled.py::"
            "test_the_graphs_of_a_model_class_are_not_all_spent_on_callers_shapes",
        ),
    ),
    Mutant(
        "hosted: an unload waits for a background compile of its version",
        SERVER + "hosted.py",
        "            self._compiles += held\n"
        "        try:\n"
        "            yield held\n"
        "        finally:\n"
        "            if held:\n"
        "                with self._idle:\n"
        "                    self._compiles -= 1\n"
        "                if self.cache is not None:\n"
        "                    self.cache.idle()\n",
        "            self._leases += held\n"
        "        try:\n"
        "            yield held\n"
        "        finally:\n"
        "            if held:\n"
        "                self.release()\n",
        (
            "tests/test_compiled.py::"
            "test_an_unload_does_not_wait_for_a_background_compile_of_its_version",
        ),
    ),
    Mutant(
        "client: empty download messages count as progress (a trickle defeats stall_timeout)",
        "client/modelhost/client/transfers.py",
        'if len(message) if isinstance(message, memoryview) else message.HasField("info"):',
        "if True:",
        ("tests/test_client_hostile.py::test_a_stalled_download_ends_with_deadline_exceeded",),
    ),
    Mutant(
        "auth: health on the main port stays open when probes have a port of their own",
        SERVER + "auth.py",
        "self._open_prefixes = () if settings.health_port else OPEN_PREFIXES",
        "self._open_prefixes = OPEN_PREFIXES",
        (
            "tests/test_hostile_round4.py::"
            "test_probes_on_a_port_of_their_own_take_only_small_requests",
        ),
    ),
    Mutant(
        "probes: one client address may hold every open Watch stream",
        SERVER + "probes.py",
        "        if self._by_address[address] >= MAX_OPEN_STREAMS_PER_ADDRESS:",
        "        if False:",
        (
            "tests/test_hostile_round4.py::"
            "test_one_address_holds_only_its_share_of_the_open_streams",
        ),
    ),
    Mutant(
        "inference: a background compile runs two then three rows (two graphs, more rows)",
        SERVER + "inference.py",
        "                self._run_with(zeros, self._compiling, dynamic_rows=count > 1)\n",
        "                self._run_with(zeros, self._compiling)\n"
        "                if count > 1:\n"
        "                    zeros = {n: torch.cat([t, t[:1]]) for n, t in zeros.items()}\n"
        "                    self._run_with(zeros, self._compiling)\n",
        (
            "tests/test_compiled.py::"
            "test_a_background_compile_makes_one_graph_for_any_row_count_above_one",
        ),
    ),
    Mutant(
        "wire: check_fields counts top-level fields only (nested entries parsed unbounded)",
        "client/modelhost/client/wire.py",
        "if field is not None and field.message is not None:",
        "if False:",
        ("tests/test_nested_limits.py::test_model_infer_bounds_nested_fields",),
    ),
    Mutant(
        "request_limits: ModelInfer's nested fields are not counted before protobuf parses them",
        SERVER + "request_limits.py",
        "        request.DESCRIPTOR,\n",
        "",
        ("tests/test_nested_limits.py::test_model_infer_bounds_nested_fields",),
    ),
    Mutant(
        "client: replies are parsed without counting their fields",
        "client/modelhost/client/calls.py",
        "            wire.check_fields(data, reply, most_fields)",
        "            pass",
        (
            "tests/test_client_reply_limits.py::"
            "test_a_reply_over_its_field_limit_is_refused_unparsed",
        ),
    ),
    Mutant(
        "client: a download into memory is bounded only by max_download_bytes",
        "client/modelhost/client/transfers.py",
        "if self.dest is None and info.size_bytes > MAX_MEMORY_DOWNLOAD_BYTES:",
        "if False:",
        ("tests/test_client_reply_limits.py::test_a_download_into_memory_is_capped",),
    ),
    Mutant(
        "inference: a detection batch runs whatever its estimated memory",
        SERVER + "inference.py",
        "        self.check_cost(batch)\n",
        "",
        ("tests/test_detection_cost.py::test_a_costly_batch_is_refused_before_the_model_runs",),
    ),
    Mutant(
        "detection: Mask R-CNN's masks pasted at the input's size are not counted",
        SERVER + "detection.py",
        "pasted = 8 * height * width if self.masks else 0",
        "pasted = 0",
        ("tests/test_detection_cost.py::test_the_estimate_covers_the_measured_peaks",),
    ),
    Mutant(
        "models: the runner ignores the operator's max_detection_bytes",
        SERVER + "models.py",
        "            max_detection_bytes=settings.max_detection_bytes,\n",
        "",
        ("tests/test_detection_cost.py::test_the_limit_is_the_servers_setting",),
    ),
    Mutant(
        "models: a detection model whose every Predict is refused loads",
        SERVER + "models.py",
        "            _check_one_image_fits(runner, loaded.inputs)\n",
        "",
        ("tests/test_detection_cost.py::test_mask_rcnn_detections_are_bounded_by_their_cost",),
    ),
    Mutant(
        "rpc: other methods' requests are parsed without counting their fields",
        SERVER + "rpc.py",
        "        if parse is not None and message is not None:  # the generated Message.FromString",
        "        if False:",
        (
            "tests/test_nested_limits.py::"
            "test_load_model_labels_are_counted_before_they_are_parsed",
            "tests/test_nested_limits.py::"
            "test_an_oip_repository_load_is_counted_before_it_is_parsed",
        ),
    ),
    Mutant(
        "request_limits: a zero-size dimension makes an input count no elements",
        SERVER + "request_limits.py",
        "    return math.prod(dim or 1 for dim in tensor.shape)",
        "    return math.prod(tensor.shape)",
        (
            "tests/test_zero_rows.py::test_a_predict_without_rows_counts_its_other_sizes",
            "tests/test_zero_rows.py::test_a_model_infer_without_rows_counts_its_other_sizes",
        ),
    ),
    Mutant(
        "inference: a batch without rows queues a background compile",
        SERVER + "inference.py",
        "        if any(rows == 0 for _, _, rows, _ in key):\n            return\n",
        "",
        ("tests/test_compiled.py::test_a_batch_without_rows_queues_no_compile",),
    ),
    Mutant(
        "metrics: a name's request and load series stay after its last version is unloaded",
        SERVER + "metrics.py",
        "            if not self._names.hosted(model):\n"
        "                self.requests.forget(model)",
        "            if False:\n                self.requests.forget(model)",
        ("tests/test_metrics_series.py::test_names_that_come_and_go_leave_no_series",),
    ),
    Mutant(
        "store: a holds file marked every blob is read as holding nothing",
        SERVER + "store_holds.py",
        '    if isinstance(held, dict) and held == EVERY_BLOB and held["every_blob"] is True:\n'
        "        return EVERY\n",
        "",
        ("tests/test_holds_bound.py::test_past_the_bound_another_server_deletes_nothing",),
    ),
    Mutant(
        "gate: health on the main port beside a probe port is served unguarded (no slot)",
        SERVER + "gate.py",
        "is_open = self.tokens is None or method.startswith(self.tokens.open_prefixes)",
        'is_open = method.startswith(("/grpc.health.v1.Health/", "/grpc.reflection."))',
        (
            "tests/test_probe_port.py::"
            "test_on_the_main_port_a_half_sent_health_check_takes_a_slot_and_times_out",
        ),
    ),
    Mutant(
        "probes: the probe port lets a connection open any number of streams",
        SERVER + "probes.py",
        '        ("grpc.max_concurrent_streams", PROBE_MAX_STREAMS),\n',
        "",
        (
            "tests/test_probe_port.py::"
            "test_a_probe_connection_holds_at_most_its_stream_cap_of_half_sent_checks",
        ),
    ),
    Mutant(
        "wire: a message the field count cannot follow is left to protobuf uncounted",
        "client/modelhost/client/wire.py",
        "    except (_Unusual, IndexError):\n        raise Unreadable(",
        "    except (_Unusual, IndexError):\n        return\n        raise Unreadable(",
        ("tests/test_nested_limits.py::test_a_model_infer_the_count_cannot_follow_is_refused",),
    ),
    Mutant(
        "wire: the numbers of a packed varint run are not counted (a byte each parses to 8)",
        "client/modelhost/client/wire.py",
        "                    read = _varints_in(data, offset, size)\n",
        "                    read = 0\n",
        (
            "tests/test_nested_limits.py::"
            "test_a_predict_shape_of_a_million_dimensions_is_refused_unparsed",
            "tests/test_nested_limits.py::"
            "test_typed_int_contents_count_against_max_tensor_elements_before_parsing",
        ),
    ),
    Mutant(
        "detection: a detection model's num_classes is not bounded (M2)",
        SERVER + "detection.py",
        '    "num_classes": _Rule(_SCORES, MAX_CLASSES),\n',
        "",
        (
            "tests/test_detection_cost.py::"
            "test_class_and_keypoint_counts_are_bounded_before_anything_is_built",
        ),
    ),
    Mutant(
        "detection: Mask R-CNN's mask logits are not counted per class (M2)",
        SERVER + "detection.py",
        "head_bytes = MASK_BYTES + 8 * int(logits.out_channels) * area",
        "head_bytes = MASK_BYTES",
        ("tests/test_detection_cost.py::test_the_estimate_covers_the_measured_peaks",),
    ),
    Mutant(
        "probes: with a probe port, open main-port Watches may take every slot",
        SERVER + "probes.py",
        "        if settings.health_port and settings.max_concurrent_rpcs:",
        "        if False:",
        ("tests/test_probe_port.py::test_main_port_streams_take_at_most_a_quarter_of_the_slots",),
    ),
    Mutant(
        "wire: a shape's runs are capped one by one (protobuf joins them into one array)",
        "client/modelhost/client/wire.py",
        "            runs[number] = runs.get(number, 0) + read\n",
        "            runs[number] = read\n",
        ("tests/test_nested_limits.py::test_a_shape_holds_at_most_max_rank_numbers_in_a_run",),
    ),
    Mutant(
        "devices: out-of-memory releases while the traceback still holds the failed step",
        SERVER + "devices.py",
        "            raise\n    if isinstance(failure, OutOfMemory):\n"
        "        release_memory(device)\n    raise failure",
        "            raise\n        if isinstance(failure, OutOfMemory):\n"
        "            release_memory(device)\n        raise failure",
        (
            "tests/test_device_memory.py::"
            "test_memory_of_a_step_that_ran_out_is_unreferenced_when_it_is_released",
        ),
    ),
    Mutant(
        "transfers: a download's partial file may be an existing path (a planted symlink)",
        "client/modelhost/client/transfers.py",
        "    | os.O_EXCL\n",
        "    | 0\n",
        ("tests/test_download_dest.py::test_a_partial_file_is_never_an_existing_path",),
    ),
    Mutant(
        "transfers: a download is written through a symlink at its destination",
        "client/modelhost/client/transfers.py",
        "self._part.replace(self.dest)",
        "self.dest.write_bytes(self._part.read_bytes())",
        ("tests/test_download_dest.py::test_a_symlink_at_dest_is_replaced_not_written_through",),
    ),
    Mutant(
        "inference: a lane's run fails while another thread FX-traces (torch 2.11's one flag)",
        SERVER + "inference.py",
        "else _run_only(module)",
        "else torch._dynamo.run(module)",
        ("tests/test_compiled.py::test_a_request_while_another_thread_fx_traces_runs_uncompiled",),
    ),
    Mutant(
        "batching: a batch is bounded by rows only (eight near-limit requests in one)",
        SERVER + "batching.py",
        "                    if elements > self._max_elements:\n                        break\n",
        "",
        ("tests/test_batching.py::test_a_batch_holds_no_more_input_elements_than_one_request_may",),
    ),
    Mutant(
        "batching: a failed batch runs its requests one by one (a bad caller de-batches all)",
        SERVER + "batching.py",
        "        failed = failed or self._in_halves  # to the request that causes the failure",
        "        failed = failed or self._one_by_one",
        (
            "tests/test_batching.py::"
            "test_a_failed_batch_is_retried_in_halves_down_to_the_request_that_fails",
        ),
    ),
    Mutant(
        "metrics: /metrics reads time out per read, not per request (trickled headers hold a slot)",
        SERVER + "metrics.py",
        "        left = self._deadline - time.monotonic()\n",
        "        left = READ_TIMEOUT\n",
        ("tests/test_metrics_deadline.py::test_trickled_headers_do_not_hold_every_slot",),
    ),
    Mutant(
        "auth: token files are never read again (a revoked token works until a restart)",
        SERVER + "auth.py",
        "if [file for file in self._files if file.refresh()]:",
        "if False:",
        ("tests/test_token_reload.py::test_a_changed_token_file_takes_effect_without_a_restart",),
    ),
    Mutant(
        "auth: an emptied token file is taken as no tokens",
        SERVER + "auth.py",
        '            return (), "holds no token (it is empty or only comments)"',
        '            return (), ""',
        ("tests/test_token_reload.py::test_an_emptied_or_unreadable_file_keeps_the_old_tokens",),
    ),
    Mutant(
        "auth: token files are stat'ed at every call",
        SERVER + "auth.py",
        "if not self._files or time.monotonic() < self._due:",
        "if not self._files:",
        ("tests/test_token_reload.py::test_the_files_are_stat_ed_at_most_once_an_interval",),
    ),
    Mutant(
        "app: tokens on a public plaintext port start without a warning",
        SERVER + "app.py",
        "        if not settings.tls_cert_file:",
        "        if False:",
        ("tests/test_plaintext_tokens.py::test_a_public_plaintext_server_with_tokens_warns",),
    ),
    Mutant(
        "channel: a token sent over plaintext beyond this machine, without a warning",
        "client/modelhost/client/channel.py",
        "if self.token and not is_local_target(target):",
        "if False:",
        (
            "tests/test_plaintext_tokens.py::test_a_token_on_a_plaintext_channel_beyond_this_machine_warns",
        ),
    ),
    Mutant(
        "rpc: Predict's metrics name no model",
        SERVER + "rpc.py",
        '    "Predict": "model",\n',
        "",
        ("tests/test_metrics_series.py::test_names_that_come_and_go_leave_no_series",),
    ),
    Mutant(
        "activations: a freed tensor still counts (the peak is the sum of everything made)",
        SERVER + "activations.py",
        "        self.now -= nbytes\n",
        "",
        ("tests/test_activation_bound.py::test_live_tensors_counts_what_is_alive_at_once",),
    ),
    Mutant(
        "activations: growth faster than linear is fitted as linear",
        SERVER + "activations.py",
        "            if quadratic > 0:",
        "            if False:",
        (
            "tests/test_activation_bound.py::test_an_exported_transformer_is_bounded_by_its_quadratic_cost",
        ),
    ),
    Mutant(
        "activations: a fixed overhead lowers the estimate of larger inputs",
        SERVER + "activations.py",
        "        return cls(large_bytes / large)",
        "        return cls((large_bytes - small_bytes) / (large - small) if large > small else 0)",
        (
            "tests/test_activation_bound.py::test_an_overhead_that_does_not_grow_is_counted_as_if_it_did",
        ),
    ),
    Mutant(
        "inference: a Predict over max_predict_bytes queues (refused only when its batch runs)",
        SERVER + "inference.py",
        "        self.check_cost(tensors)  # before it waits in a queue\n",
        "",
        (
            "tests/test_activation_bound.py::test_a_predict_over_its_bound_is_refused_and_the_server_serves_on",
        ),
    ),
    Mutant(
        "inference: batches are merged past max_predict_bytes",
        SERVER + "inference.py",
        "        return min(limit, self.activations.elements_within(self.max_predict_bytes, row))",
        "        return limit",
        ("tests/test_activation_bound.py::test_batches_stop_short_of_the_bound",),
    ),
    Mutant(
        "models: the runner ignores the operator's max_predict_bytes",
        SERVER + "models.py",
        "            max_predict_bytes=settings.max_predict_bytes,\n",
        "",
        (
            "tests/test_activation_bound.py::test_a_predict_over_its_bound_is_refused_and_the_server_serves_on",
        ),
    ),
    Mutant(
        "models: a model without a skeleton (an exported program) is not measured",
        SERVER + "models.py",
        "        elif inputs and runner.activations is None:\n",
        "        elif False:\n",
        (
            "tests/test_activation_bound.py::"
            "test_an_exported_transformer_is_bounded_by_its_quadratic_cost",
        ),
    ),
    Mutant(
        "loading: the skeleton's activations count the probe's own input",
        SERVER + "loading.py",
        "        return peak_bytes(lambda: call_with(module, inputs, made))",
        "        return peak_bytes(lambda: call_with(module, inputs, [t.clone() for t in made]))",
        (
            "tests/test_activation_bound.py::"
            "test_the_skeleton_on_the_meta_device_costs_what_the_model_does",
        ),
    ),
    Mutant(
        "loading: a bfloat16 version's activations are counted in float32",
        SERVER + "loading.py",
        "        activations = activations.scaled(dtype.itemsize / 4)",
        "        pass",
        (
            "tests/test_activation_bound.py::"
            "test_the_skeleton_on_the_meta_device_costs_what_the_model_does",
        ),
    ),
    Mutant(
        "batching: a batch run again in halves is not counted",
        SERVER + "batching.py",
        "        if self._on_split:\n            self._on_split()\n",
        "",
        (
            "tests/test_batching.py::"
            "test_a_failed_batch_is_retried_in_halves_down_to_the_request_that_fails",
        ),
    ),
    Mutant(
        "oip_tensors: an output requested twice is answered twice",
        SERVER + "oip_tensors.py",
        "        if output.name in names:",
        "        if False:",
        ("tests/test_reply_limits.py::test_an_output_named_twice_is_refused",),
    ),
    Mutant(
        "service: a Predict reply over max_message_bytes is built before it is refused",
        SERVER + "service.py",
        "        check_reply_bytes(answer.outputs.items(), limit, messages=answer.top_k)\n",
        "",
        (
            "tests/test_reply_limits.py::"
            "test_a_reply_over_the_message_limit_is_refused_before_it_is_built",
        ),
    ),
    Mutant(
        "architectures: request JSON of any length is parsed",
        SERVER + "architectures.py",
        "    if len(text) > MAX_JSON_BYTES:",
        "    if False:",
        ("tests/test_oip.py::test_configs_of_a_wrong_shape_are_invalid_argument",),
    ),
    Mutant(
        "batching: when both halves fail, each half is halved again (about 2n runs)",
        SERVER + "batching.py",
        "        if len(failures) == 2:",
        "        if False:",
        ("tests/test_batching.py::test_when_both_halves_fail_each_request_runs_alone",),
    ),
    Mutant(
        "cache: a shared page-in waits for room only up to the deadline of its first request",
        SERVER + "cache.py",
        "                if now >= until:\n                    raise\n",
        "                if True:\n                    raise\n",
        (
            "tests/test_pagein_deadline.py::test_a_short_deadline_does_not_end_the_page_in_the_others_wait_for",
        ),
    ),
    Mutant(
        "cache: a page-in that ended at another request's deadline fails all that wait for it",
        SERVER + "cache.py",
        "                if deadline is not None and time.monotonic() >= deadline:\n"
        "                    raise\n",
        "                raise\n",
        (
            "tests/test_pagein_deadline.py::test_a_request_with_time_left_starts_a_page_in_again_that_ended_at_a_deadline",
        ),
    ),
    Mutant(
        "cache: a page-in waits for room after every request for it has passed its deadline",
        SERVER + "cache.py",
        "        if time.monotonic() >= until:\n            self._metrics.page_ins_skipped",
        "        if False:\n            self._metrics.page_ins_skipped",
        ("tests/test_cache.py::test_a_page_in_nobody_waits_for_any_more_is_skipped",),
    ),
    Mutant(
        "store: blobs opened blocking (a FIFO planted there wedges a page-in)",
        SERVER + "store_files.py",
        "_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | _OPEN_FLAGS",
        "_READ_FLAGS = os.O_RDONLY | _OPEN_FLAGS",
        (
            "tests/test_blob_hostile.py::"
            "test_a_page_in_from_a_planted_blob_is_data_loss_and_others_serve[fifo]",
        ),
    ),
    Mutant(
        "loading: weights read by the blob's name (a symlink planted there is followed)",
        SERVER + "loading.py",
        "        with store.open_blob(record) as blob:"
        "  # a symlink or FIFO there: DATA_LOSS, at once\n"
        "            state = formats.read_weights(blob, record.format)",
        "        if True:\n"
        '            state = formats.read_weights(store.root / "blobs" / record.sha256,'
        " record.format)",
        (
            "tests/test_blob_hostile.py::"
            "test_a_page_in_from_a_planted_blob_is_data_loss_and_others_serve[symlink]",
        ),
    ),
    Mutant(
        "store: EFBIG (a file too large for the file system) is not a full store: INTERNAL",
        SERVER + "store_files.py",
        "FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)",
        "FULL = (errno.ENOSPC, errno.EDQUOT)",
        (
            "tests/test_blob_hostile.py::"
            "test_a_file_larger_than_the_file_system_takes_is_resource_exhausted",
        ),
    ),
    Mutant(
        "restore: a record that is JSON but not a list is read as one (the start crashes)",
        SERVER + "restore.py",
        "        if state is not None and not isinstance(state, list):",
        "        if False:",
        (
            "tests/test_restore_record_hostile.py::test_an_unreadable_record_restores_nothing_and_is_kept_aside",
        ),
    ),
    Mutant(
        "restore: an unreadable record stops the start",
        SERVER + "restore.py",
        "        except ValueError as error:\n            state = self._set_aside(error)",
        "        except ZeroDivisionError as error:\n            state = self._set_aside(error)",
        (
            "tests/test_restore_record_hostile.py::test_an_unreadable_record_restores_nothing_and_is_kept_aside",
        ),
    ),
    Mutant(
        "architectures: an input a builder of your own declares is ignored",
        SERVER + "architectures.py",
        '        if declared:\n            return (("input", *declared),)\n',
        "",
        (
            "tests/test_activation_bound.py::"
            "test_a_builder_of_your_own_that_declares_its_input_is_measured_too",
        ),
    ),
    Mutant(
        "models: a CPU version's workspace is the per-layer estimate, not its activations",
        SERVER + "models.py",
        '        if loaded.device.type == "cpu" and request.warmup_shape:\n',
        "        if False:\n",
        (
            "tests/test_activation_bound.py::"
            "test_a_cpu_version_counts_its_largest_warm_up_batch_as_workspace",
        ),
    ),
    Mutant(
        "inference: several inputs may set a setting of forward (RAFT's num_flow_updates)",
        SERVER + "inference.py",
        "        if parameter.default is not parameter.empty and parameter.default is not None:",
        "        if False:",
        ("tests/test_forward_settings.py::test_inputs_fill_parameters_and_never_settings",),
    ),
    Mutant(
        "inference: several inputs to a model that declares none are not checked",
        SERVER + "inference.py",
        "        elif len(tensors) > 1:\n            _check_keywords(self._parameters, tensors)\n",
        "",
        ("tests/test_forward_settings.py::test_inputs_fill_parameters_and_never_settings",),
    ),
    Mutant(
        "activations: no floor (a Swin window's least cost is not counted)",
        SERVER + "activations.py",
        "        return max(self.floor, elements * (self.linear + self.quadratic * elements))",
        "        return elements * (self.linear + self.quadratic * elements)",
        (
            "tests/test_activation_bound.py::"
            "test_thin_and_tiny_rows_are_estimated_at_what_they_take",
        ),
    ),
    Mutant(
        "activations: thin rows are counted as they are (no least size per dimension)",
        SERVER + "activations.py",
        "        if len(row) != len(self.least):\n            return row\n",
        "        return row\n",
        (
            "tests/test_activation_bound.py::"
            "test_thin_and_tiny_rows_are_estimated_at_what_they_take",
        ),
    ),
    Mutant(
        "activations: the meta device runs no larger sizes (RAFT's square growth unseen)",
        SERVER + "activations.py",
        "    larger = [side * f for f in factors] if meta and runs.opened else []",
        "    larger: list[int] = []",
        ("tests/test_activation_bound.py::test_raft_takes_two_named_images_and_is_bounded",),
    ),
    Mutant(
        "architectures: RAFT's two inputs are unknown",
        SERVER + "architectures.py",
        '    "optical_flow": (("image1", _IMAGE, torch.float32), '
        '("image2", _IMAGE, torch.float32)),\n',
        "",
        ("tests/test_activation_bound.py::test_raft_takes_two_named_images_and_is_bounded",),
    ),
    Mutant(
        "models: a model that takes no probe size is served unbounded",
        SERVER + "models.py",
        "    if runner.activations is None and runner.max_predict_bytes:",
        "    if False:",
        (
            "tests/test_activation_bound.py::"
            "test_a_model_that_takes_no_probe_size_is_measured_at_its_warmup_shape",
        ),
    ),
    Mutant(
        "models: a model that takes no probe size is not measured at its warmup_shape",
        SERVER + "models.py",
        "    if runner.activations is None and warmup_shape and len(inputs) == 1:",
        "    if False:",
        (
            "tests/test_activation_bound.py::"
            "test_a_model_that_takes_no_probe_size_is_measured_at_its_warmup_shape",
        ),
    ),
    Mutant(
        "inference: preprocessing uint8 images is not counted against max_predict_bytes",
        SERVER + "inference.py",
        "            estimate = self.activations.estimate(shapes) + preprocessing\n",
        "            estimate = self.activations.estimate(shapes)\n",
        (
            "tests/test_activation_bound.py::"
            "test_preprocessing_uint8_images_counts_against_the_bound",
        ),
    ),
    Mutant(
        "store: a record another server mended meanwhile is set aside anyway",
        SERVER + "store.py",
        "            try:\n                read()\n                return None\n"
        "            except ValueError:\n                pass\n",
        "",
        (
            "tests/test_restore_record_hostile.py::"
            "test_a_record_another_server_mended_meanwhile_is_read_not_set_aside",
        ),
    ),
    Mutant(
        "request_limits: a reply's framing is not counted (gRPC's own refusal at the edge)",
        SERVER + "request_limits.py",
        "    data, total = 0, REPLY_FRAMING\n"
        "    for name, tensor in outputs:\n"
        "        size = len(tensor.data)\n"
        "        data += size\n"
        "        total += size + len(name.encode()) + 10 * len(tensor.shape) + OUTPUT_FRAMING\n",
        "    data, total = 0, 0\n"
        "    for name, tensor in outputs:\n"
        "        size = len(tensor.data)\n"
        "        data += size\n"
        "        total += size\n",
        (
            "tests/test_reply_limits.py::"
            "test_a_reply_whose_framing_passes_the_limit_is_refused_by_the_server",
        ),
    ),
    Mutant(
        "request_limits: an output's shape is not counted in its reply's size",
        SERVER + "request_limits.py",
        " + 10 * len(tensor.shape) + OUTPUT_FRAMING\n",
        " + OUTPUT_FRAMING\n",
        ("tests/test_reply_limits.py::test_the_count_bounds_the_encoded_reply",),
    ),
    Mutant(
        "request_limits: an output's name is not counted in its reply's size",
        SERVER + "request_limits.py",
        "        total += size + len(name.encode()) + 10",
        "        total += size + 10",
        ("tests/test_reply_limits.py::test_the_count_bounds_the_encoded_reply",),
    ),
    Mutant(
        "request_limits: Predict's top_k rows are not counted in its reply's size",
        SERVER + "request_limits.py",
        "    total += sum(message.ByteSize() + FIELD_FRAMING for message in messages)\n",
        "",
        ("tests/test_reply_limits.py::test_the_count_bounds_the_encoded_reply",),
    ),
    Mutant(
        "oip_tensors: the request id a ModelInfer reply echoes is not counted in its size",
        SERVER + "oip_tensors.py",
        " for name in names], max_bytes, [request_id])\n",
        " for name in names], max_bytes)\n",
        ("tests/test_reply_limits.py::test_the_count_bounds_the_encoded_reply",),
    ),
    Mutant(
        "devices: Triton's, cuBLAS's and cuDNN's spellings of a lost context are not probed",
        SERVER + "devices.py",
        "    return any(spelling in text for spelling in PROBED_CUDA_ERRORS) and context_lost()",
        "    return False",
        (
            "tests/test_gpu_paths.py::"
            "test_other_spellings_are_device_failures_when_the_context_is_lost",
        ),
    ),
    Mutant(
        "devices: a probed spelling is a failed device without the probe (health goes down)",
        SERVER + "devices.py",
        "    return any(spelling in text for spelling in PROBED_CUDA_ERRORS) and context_lost()",
        "    return any(spelling in text for spelling in PROBED_CUDA_ERRORS)",
        (
            "tests/test_gpu_paths.py::"
            "test_other_spellings_fail_only_their_call_when_the_context_is_fine",
        ),
    ),
    Mutant(
        "devices: release_memory waits for a CUDA-graph run (a compile holds up OOM replies)",
        SERVER + "devices.py",
        "    if not CUDA_GRAPHS.acquire(blocking=False):\n        log.debug(",
        "    if not CUDA_GRAPHS.acquire():\n        log.debug(",
        ("tests/test_gpu_paths.py::test_release_memory_never_waits_for_a_cuda_graph_run",),
    ),
    Mutant(
        "cache: an eviction collects and releases memory with the cache's lock held",
        SERVER + "cache.py",
        "                stale.append(device)",
        "                release_memory(device)",
        (
            "tests/test_gpu_paths.py::"
            "test_an_eviction_releases_memory_after_the_cache_lock_is_released",
        ),
    ),
    Mutant(
        "cache: cached pinned host blocks are never given back after a host-tier page-in",
        SERVER + "cache.py",
        "        if held is None or held > self._host_limit:\n            release_host_memory()",
        "        del held",
        ("tests/test_gpu_paths.py::test_pinned_host_memory_is_trimmed_past_the_host_budget_only",),
    ),
    Mutant(
        "host: a failed device during LoadModel leaves health SERVING",
        SERVER + "host.py",
        "        self.models.on_device_failure = self._device_failed  # a load's, as a Predict's\n",
        "",
        (
            "tests/test_device_memory.py::"
            "test_a_failed_device_during_a_load_turns_health_not_serving",
        ),
    ),
    Mutant(
        "hosted: a version unloaded during its first page-in keeps what the build made",
        SERVER + "hosted.py",
        "            gone = self._retired()\n",
        "            gone = False\n",
        (
            "tests/test_cache.py::"
            "test_an_unload_during_a_restored_versions_first_page_in_frees_what_it_built",
        ),
    ),
    Mutant(
        "hosted: a page-in after an unload drops the module its waiting requests need",
        SERVER + "hosted.py",
        "        return self.retiring and not self._leases\n",
        "        return self.retiring\n",
        ("tests/test_cache.py::test_an_unload_while_a_page_in_runs_answers_its_request_first",),
    ),
    Mutant(
        "batching: a batcher closed twice leaves its lane twice (the page-in fails)",
        SERVER + "batching.py",
        "            if self._left:\n                return\n",
        "",
        ("tests/test_batching.py::test_a_batcher_closed_twice_leaves_its_lane_once",),
    ),
    Mutant(
        "batching: a group that cannot be joined fails INTERNAL",
        SERVER + "batching.py",
        "        except Exception:  # no memory to join them in (pinned, for a GPU): smaller"
        " batches\n            failed(group)\n            return _nothing\n",
        "        except ZeroDivisionError:\n            return _nothing\n",
        ("tests/test_batching.py::test_a_batch_that_cannot_be_joined_runs_in_smaller_batches",),
    ),
    Mutant(
        "activations: two thin dimensions at once cost what each alone shows",
        SERVER + "activations.py",
        "            least[i - 1], least[j - 1] = least[i - 1] * grow, least[j - 1] * grow\n",
        "            pass\n",
        (
            "tests/test_activation_bound.py::"
            "test_thin_and_tiny_rows_are_estimated_at_what_they_take",
        ),
    ),
    Mutant(
        "activations: a small dimension counts as its least size, not rounded up to it",
        SERVER + "activations.py",
        "least * math.ceil(size / least)",
        "max(size, least)",
        (
            "tests/test_activation_bound.py::"
            "test_thin_and_tiny_rows_are_estimated_at_what_they_take",
        ),
    ),
    Mutant(
        "inference: an input may fill a forward parameter annotated as a number",
        SERVER + "inference.py",
        '        if annotation is not parameter.empty and "Tensor" not in str(annotation):',
        "        if False:",
        ("tests/test_forward_settings.py::test_inputs_fill_parameters_and_never_settings",),
    ),
    Mutant(
        "store: a blob of another length than it was stored with is opened and mapped",
        SERVER + "store.py",
        "        try:\n            _check_size(record, os.fstat(fd))\n",
        "        try:\n            pass\n",
        (
            "tests/test_blob_hostile.py::"
            "test_a_page_in_from_a_planted_blob_is_data_loss_and_others_serve",
        ),
    ),
    Mutant(
        "store: a hold that cannot be written is taken anyway while other servers share it",
        SERVER + "store_holds.py",
        "                if others:\n",
        "                if False:\n",
        (
            "tests/test_disk_full.py::test_a_load_whose_hold_cannot_be_written_is_refused_"
            "while_another_server_shares_the_store",
        ),
    ),
    Mutant(
        "cache: a page-in waits for room while nobody waits for it any more",
        SERVER + "cache.py",
        "    return hosted.paging_until if hosted.paging_waiters else 0.0\n",
        "    return hosted.paging_until\n",
        ("tests/test_cache.py::test_a_queued_page_in_whose_caller_cancelled_is_skipped",),
    ),
    Mutant(
        "store: a manifest entry with a NaN loss (a diverged run) reads as unreadable",
        SERVER + "store.py",
        "    return type(value) is float or (type(value) is int and abs(value) <= 1 << 53)\n",
        "    return type(value) is float and value == value\n",
        ("tests/test_service.py::test_a_diverged_runs_checkpoint_stays_listed_and_loads",),
    ),
    Mutant(
        "settings: a setting out of its range is taken (max_batch_size 0)",
        SERVER + "settings.py",
        "            if not least <= value <= most:\n",
        "            if False:\n",
        ("tests/test_settings.py",),
    ),
    Mutant(
        "loading: a checkpoint of several floating dtypes is adopted as stored",
        SERVER + "loading.py",
        "    as_stored = spec.dtype is not None or (len(floats) <= 1 and floats <= WEIGHT_DTYPES)",
        "    as_stored = True",
        (
            "tests/test_checkpoint_dtypes.py::"
            "test_a_float16_body_with_a_float32_head_serves_as_the_in_process_model",
        ),
    ),
    Mutant(
        "loading: an expanded tensor (elements sharing memory) is adopted",
        SERVER + "loading.py",
        "    return tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes()",
        "    return False",
        ("tests/test_checkpoint_dtypes.py::test_an_expanded_tensor_is_invalid_argument",),
    ),
    Mutant(
        "oip: a model whose batch is fixed is configured as batched",
        SERVER + "oip.py",
        "    batched = not fixed_batch(hosted.runner.inputs)",
        "    batched = True",
        ("tests/test_oip.py::test_the_config_of_a_model_with_a_fixed_batch_says_so",),
    ),
    Mutant(
        "restore: a version restored at the store tier ignores the dtype it served with",
        SERVER + "models.py",
        "        dtype = spec.dtype or (served.dtype if served else torch.float32)\n",
        "        dtype = spec.dtype or torch.float32\n",
        ("tests/test_cache.py::test_a_version_restored_at_the_store_tier_shows_what_it_served_as",),
    ),
    Mutant(
        "inference: outputs no reply can carry are recorded, and fail as INTERNAL",
        SERVER + "inference.py",
        "            if unsendable:\n",
        "            if False:\n",
        (
            "tests/test_checkpoint_dtypes.py::test_outputs_no_reply_can_carry_are_"
            "failed_precondition_and_the_record_stays_writable",
        ),
    ),
    Mutant(
        "loading: a sparse tensor in a checkpoint is not refused",
        SERVER + "loading.py",
        "    if sparse:\n",
        "    if False:\n",
        ("tests/test_checkpoint_dtypes.py::test_a_sparse_tensor_is_invalid_argument",),
    ),
    Mutant(
        "models: a load lets go of its bytes as its caller leaves, before its commit",
        SERVER + "models.py",
        "        await _to_the_end(self._commit_load(hosted, held))\n",
        "        await self._let_go(held)\n"
        "        await _to_the_end(self._commit_load(hosted, held))\n",
        (
            "tests/test_cache_races.py::test_a_load_whose_caller_leaves_during_its_commit_keeps_its_bytes",
        ),
    ),
    Mutant(
        "models: a hold taken after its caller left is kept",
        SERVER + "models.py",
        "            job.add_done_callback(self._let_go_if_held)\n",
        "",
        (
            "tests/test_cache_races.py::test_a_load_whose_caller_leaves_while_it_waits_to_hold_holds_nothing",
        ),
    ),
    Mutant(
        "store: a let-go the store's lock refuses fails the unload",
        SERVER + "store.py",
        "        except StoreBusy as error:\n            log.warning(",
        "        except ZeroDivisionError as error:\n            log.warning(",
        ("tests/test_cache_races.py::test_a_busy_store_lock_does_not_fail_an_unload",),
    ),
    Mutant(
        "cache: two loads keep their rooms while each waits for more",
        SERVER + "cache.py",
        "            if key in self._reserved and loading and self._waiting.issuperset(loading):",
        "            if False:",
        (
            "tests/test_cache_races.py::test_two_loads_that_each_hold_room_for_their_weights_both_load",
        ),
    ),
    Mutant(
        "cache: an unloaded version stops counting while its requests run",
        SERVER + "cache.py",
        "            self._leaving.extend(removed)\n",
        "",
        ("tests/test_cache_races.py::test_an_unloaded_version_counts_until_its_requests_are_done",),
    ),
    Mutant(
        "hosted: a version is evicted while a batch nobody waits for runs on it",
        SERVER + "hosted.py",
        "        return self.batcher.running\n",
        "        return False\n",
        (
            "tests/test_cache_races.py::test_a_running_batch_whose_callers_left_keeps_its_version_resident",
        ),
    ),
    Mutant(
        "models: a model whose rows depend on the batch is batched",
        SERVER + "models.py",
        "            policy = rows_policy(found, policy, request, spec.name)",
        "            pass",
        ("tests/test_batching.py::test_a_model_whose_rows_depend_on_the_batch_is_not_batched",),
    ),
    Mutant(
        "rows_check: a rows check calls rounding a difference",
        SERVER + "rows_check.py",
        "<= ROWS_CHECK_TOLERANCE * largest + 1e-6",
        "<= 0",
        ("tests/test_batching.py::test_a_model_whose_rows_are_independent_is_batched",),
    ),
    Mutant(
        "rpc: an answer to a call gRPC ended meanwhile fails as gRPC's ERROR",
        SERVER + "rpc.py",
        "    except Exception:\n        raise asyncio.CancelledError from None\n",
        "",
        (
            "tests/test_pagein_deadline.py::"
            "test_deadlines_that_pass_as_the_answer_goes_out_log_no_error",
        ),
    ),
    Mutant(
        "oip: a request's timeout parameter is ignored",
        SERVER + "oip.py",
        "            _sooner(context.time_remaining(), until),",
        "            context.time_remaining(),",
        ("tests/test_oip.py::test_triton_parameters_modelhost_does_not_serve_are_refused",),
    ),
    Mutant(
        "oip: shared-memory outputs are answered in the reply",
        SERVER + "oip_tensors.py",
        "            if any(name in tensor.parameters for name in SHARED_MEMORY):",
        "            if False:",
        ("tests/test_oip.py::test_triton_parameters_modelhost_does_not_serve_are_refused",),
    ),
    Mutant(
        "auth: a token file that is no regular file is read",
        SERVER + "auth.py",
        "        if not stat.S_ISREG(os.fstat(fd).st_mode):",
        "        if False:",
        (
            "tests/test_token_reload.py::test_a_token_file_that_blocks_or_never_ends_holds_up_no_call",
        ),
    ),
    Mutant(
        "gate: any number of requests are received at once",
        SERVER + "gate.py",
        "        most = min(self.message_bytes, budget.total)  # at least one message fits",
        "        most = 0",
        ("tests/test_receiving.py::test_requests_past_the_receiving_budget_wait_for_their_turn",),
    ),
    Mutant(
        "app: a connection may open any number of calls",
        SERVER + "app.py",
        '            options.append(("grpc.max_concurrent_streams", '
        "settings.max_streams_per_connection))\n",
        "            pass\n",
        ("tests/test_receiving.py::test_a_connection_holds_at_most_its_cap_of_calls",),
    ),
    Mutant(
        "app: gRPC's window probing grants a waiting request tens of MiB",
        SERVER + "app.py",
        '            ("grpc.http2.bdp_probe", 0),\n',
        "",
        (
            "tests/test_receiving.py::"
            "test_a_request_waiting_for_its_turn_is_sent_no_more_than_a_small_window",
        ),
    ),
    Mutant(
        "auth: a call that starts a look at the token files does not wait for it",
        SERVER + "auth.py",
        "                await asyncio.wait_for(asyncio.shield(look), LOOK_WAIT)",
        "                await asyncio.wait_for(asyncio.shield(look), 0)",
        (
            "tests/test_token_reload.py::"
            "test_a_revoked_token_is_refused_from_the_first_call_after_the_look",
        ),
    ),
    Mutant(
        "rows_check: a model whose outputs are random is found to mix rows",
        SERVER + "rows_check.py",
        "        if not _same_outputs(again, alone):",
        "        if False:",
        (
            "tests/test_batching.py::"
            "test_a_model_whose_outputs_are_random_is_batched_only_when_the_load_asks",
        ),
    ),
    Mutant(
        "devices: a container's memory limit is not the memory",
        SERVER + "devices.py",
        "            total = min(total, int(text))",
        "            pass",
        ("tests/test_receiving.py::test_the_default_receiving_budget_is_a_quarter_of_the_memory",),
    ),
    Mutant(
        "loading: the skeleton is probed in its inputs' float dtype (remembered as float32)",
        SERVER + "loading.py",
        "    return torch.float32 if given.dtype.is_floating_point else given.dtype",
        "    return given.dtype",
        (
            "tests/test_activation_bound.py::"
            "test_the_remembered_cost_does_not_depend_on_which_dtype_probed_first",
        ),
    ),
    Mutant(
        "rpc: a reply ready after the caller's deadline is handed to gRPC",
        SERVER + "rpc.py",
        "    if context.time_remaining() == 0:  # None: no deadline",
        "    if False:",
        ("tests/test_pagein_deadline.py::test_a_reply_ready_after_the_deadline_is_not_sent",),
    ),
    Mutant(
        "rpc: a call whose deadline passed counts as cancelled",
        SERVER + "rpc.py",
        "            passed = context.time_remaining() == 0",
        "            passed = False",
        (
            "tests/test_pagein_deadline.py::"
            "test_a_call_whose_deadline_passed_is_counted_as_deadline_exceeded",
        ),
    ),
    Mutant(
        "app: a port in use is left to gRPC's bind (and its own log line)",
        SERVER + "app.py",
        "    if port == 0:\n        return\n    try:\n        found = socket.getaddrinfo(",
        "    if True:\n        return\n    try:\n        found = socket.getaddrinfo(",
        (
            "tests/test_cli_usability.py::test_serve_in_a_used_port_or_on_a_missing_gpu_says_so_in_one_line",
        ),
    ),
    Mutant(
        "cli: importing the CLI quiets gRPC for the whole program",
        "client/modelhost/cli/__init__.py",
        'if Path(sys.argv[0]).stem == "modelhost" or sys.argv[0] == "-m":',
        "if True:",
        ("tests/test_cli_usability.py::test_importing_the_cli_leaves_the_environment_alone",),
    ),
    Mutant(
        "gate: open methods on the main port skip the reader (no budget, no read timeout)",
        SERVER + "gate.py",
        "            served = self._guarded(\n                handler,",
        "            served = handler if is_open else self._guarded(\n                handler,",
        (
            "tests/test_receiving.py::"
            "test_half_sent_health_checks_without_a_token_hold_at_most_their_budget",
        ),
    ),
    Mutant(
        "app: the probe port serves without a gate (gRPC logs a request that does not parse)",
        SERVER + "app.py",
        "grpc.aio.server(interceptors=[probe_gate],",
        "grpc.aio.server(interceptors=[],",
        (
            "tests/test_receiving.py::"
            "test_a_health_check_that_does_not_parse_is_refused_without_an_error_log",
        ),
    ),
    Mutant(
        "gate: a received request stops counting against the budget",
        SERVER + "gate.py",
        "            receipt.nbytes = min(len(data), most)",
        "            receipt.nbytes = 0",
        (
            "tests/test_receiving.py::"
            "test_received_requests_count_against_the_budget_until_their_call_ends",
        ),
    ),
    Mutant(
        "store: recover() removes a starting server's files from its stale list of live owners",
        SERVER + "store.py",
        "                if not self._locks.in_use(leftover) and removed(leftover):",
        "                if removed(leftover):",
        (
            "tests/test_store_owner_race.py::test_a_server_starting_while_another_cleans_up_keeps_its_files",
        ),
    ),
    Mutant(
        "store: an owner file is created in place, then locked",
        SERVER + "store_locks.py",
        '            starting = self._tmp / f"{self.owner}{STARTING}{attempt}"',
        "            starting = self._owner_path",
        (
            "tests/test_store_owner_race.py::"
            "test_a_clean_up_between_a_starts_create_and_lock_removes_nothing_it_needs",
        ),
    ),
    Mutant(
        "store: a probe's brief lock fails a start",
        SERVER + "store_locks.py",
        "                locks = _flock_by(file, deadline)",
        "                locks = _flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        ("tests/test_store_owner_race.py::test_another_starts_brief_probe_does_not_fail_a_start",),
    ),
    Mutant(
        "cache: a page-in waits for busy versions' room on the device's page-in thread",
        SERVER + "cache.py",
        "key, device, hosted.device_bytes, deadline=time.monotonic(), asks_again=True",
        "key, device, hosted.device_bytes, deadline=_wanted_until(hosted), asks_again=True",
        (
            "tests/test_cache_races.py::test_a_page_in_waiting_for_busy_room_holds_up_no_other_page_in",
        ),
    ),
    Mutant(
        "rows_check: a rows check that cannot tell leaves the model batched (fails open)",
        SERVER + "rows_check.py",
        "    if mixes is False:",
        "    if not mixes:",
        (
            "tests/test_batching.py::"
            "test_a_rows_check_over_max_predict_bytes_runs_small_rows_or_fails_closed",
        ),
    ),
    Mutant(
        "rows_check: the rows check compares NaN-blind (NaN counts as alike)",
        SERVER + "rows_check.py",
        "    alone, batched = alone.double(), batched.double()",
        "    return not float((batched.double() - alone.double()).abs().max()) > (\n"
        "        ROWS_CHECK_TOLERANCE * float(alone.double().abs().max()) + 1e-6\n"
        "    )",
        (
            "tests/test_batching.py::test_a_model_undefined_on_negative_values_whose_rows_"
            "depend_on_the_batch_is_not_batched",
        ),
    ),
    Mutant(
        "rows_check: the rows check draws normal rows only",
        SERVER + "rows_check.py",
        ', "uniform": "uniform rows in [0, 1)"}',
        "}",
        (
            "tests/test_batching.py::test_a_model_undefined_on_negative_values_whose_rows_"
            "depend_on_the_batch_is_not_batched",
        ),
    ),
    Mutant(
        "models: store work that waits for the store lock runs on asyncio's default threads",
        SERVER + "models.py",
        "        return _on(self._store_work, work, *args)",
        "        return asyncio.to_thread(work, *args)  # type: ignore[return-value]",
        (
            "tests/test_cache_races.py::"
            "test_loads_waiting_for_the_store_lock_hold_up_neither_requests_nor_token_looks",
        ),
    ),
    Mutant(
        "auth: the look at the token files queues on asyncio's default threads",
        SERVER + "auth.py",
        "            look = _on_a_thread_of_its_own(self._look)",
        "            look = asyncio.ensure_future(asyncio.to_thread(self._look))",
        ("tests/test_token_reload.py::test_a_look_at_the_token_files_waits_for_no_other_work",),
    ),
    Mutant(
        "gate: an open method's request counts until its call ends (a Watch: for ever)",
        SERVER + "gate.py",
        "        receipt = _Receipt(budget, kept=not is_open)",
        "        receipt = _Receipt(budget, kept=True)",
        (
            "tests/test_receiving.py::test_open_watch_and_reflection_streams_keep_no_health_check_waiting",
        ),
    ),
    Mutant(
        "gate: idle reflection streams take health's budget",
        SERVER + "gate.py",
        "                budget = self.reflection_receiving if reflection else self.open_receiving",
        "                budget = self.open_receiving",
        (
            "tests/test_receiving.py::test_open_watch_and_reflection_streams_keep_no_health_check_waiting",
        ),
    ),
    Mutant(
        "app: a receiving budget below two messages is kept (one held request blocks all)",
        SERVER + "app.py",
        "    return max(budget, 2 * settings.max_message_bytes)",
        "    return budget",
        ("tests/test_receiving.py::test_the_default_receiving_budget_is_a_quarter_of_the_memory",),
    ),
    Mutant(
        "models: a restored version's first build waits for its workspace on the page-in thread",
        SERVER + "models.py",
        "wanted, deadline=time.monotonic(), asks_again=True",
        "wanted, deadline=hosted.paging_until, asks_again=True",
        (
            "tests/test_cache_races.py::test_a_restored_version_whose_workspace_has_no_room_holds_up_no_other_page_in",
        ),
    ),
    Mutant(
        "models: a first build without room forgets what it needed (builds again, and again)",
        SERVER + "models.py",
        "            hosted.workspace_bytes = max(\n",
        "            _ = max(\n",
        (
            "tests/test_cache_races.py::test_a_restored_version_whose_workspace_has_no_room_holds_up_no_other_page_in",
        ),
    ),
    Mutant(
        "models: an unload waits for its busy version on one of asyncio's threads",
        SERVER + "models.py",
        "            await hosted.retiring_until_idle()\n            await _on(",
        "            await _on(",
        ("tests/test_cache_races.py::test_unloads_of_busy_versions_hold_none_of_asyncios_threads",),
    ),
    Mutant(
        "service: an upload's spooled chunks are not counted in the receiving budget",
        SERVER + "service.py",
        "            keep = stream.keep_last if isinstance(stream, RequestStream) else None\n",
        "            keep = None\n",
        (
            "tests/test_receiving.py::test_an_uploads_chunks_waiting_to_be_written_count_in_the_receiving_budget",
        ),
    ),
    Mutant(
        "checkpoints: chunks never written keep their bytes of the receiving budget",
        SERVER + "checkpoints.py",
        "chunks never written: the upload failed or was cancelled\n                release()\n",
        "chunks never written: the upload failed or was cancelled\n                pass\n",
        (
            "tests/test_receiving.py::test_an_uploads_chunks_waiting_to_be_written_count_in_the_receiving_budget",
        ),
    ),
    Mutant(
        "checkpoints: a written chunk keeps its bytes of the receiving budget",
        SERVER + "checkpoints.py",
        "                kept.remove(release)\n                release()\n",
        "                kept.remove(release)\n",
        (
            "tests/test_receiving.py::test_an_uploads_chunks_waiting_to_be_written_count_in_the_receiving_budget",
        ),
    ),
    Mutant(
        "cache: a waiting page-in evicts idle versions even when that does not make room",
        SERVER + "cache.py",
        "                if enough and self._evict_one(candidates, stale):",
        "                if self._evict_one(candidates, stale):",
        (
            "tests/test_cache_races.py::test_a_claim_that_cannot_drain_lapses_evicts_nothing_and_keeps_its_room_meanwhile",
        ),
    ),
    Mutant(
        "cache: a page-in waits for room up to its deadline, however far",
        SERVER + "cache.py",
        "if now >= room_since + ROOM_WAIT_SECONDS:",
        "if now >= room_since + math.inf:",
        (
            "tests/test_cache_races.py::test_a_claim_that_cannot_drain_lapses_evicts_nothing_and_keeps_its_room_meanwhile",
        ),
    ),
    Mutant(
        "cache: a page-in that ends after its unload records its metrics",
        SERVER + "cache.py",
        "        hosted.record(lambda: page_ins(hosted.name, str(hosted.version), tier).inc())",
        "        page_ins(hosted.name, str(hosted.version), tier).inc()",
        (
            "tests/test_metrics_series.py::test_a_page_in_that_ends_after_its_unload_records_nothing",
        ),
    ),
    Mutant(
        "batching: vectors of a model without declared inputs are merged as rows",
        SERVER + "batching.py",
        "return not self._vectors_are_rows and any(t.dim() < 2 for t in request.inputs.values())",
        "return False",
        (
            "tests/test_batching.py::"
            "test_vectors_sent_to_a_model_without_declared_inputs_are_never_merged",
        ),
    ),
    Mutant(
        "batching: a bug while grouping a batch leaves its callers waiting",
        SERVER + "batching.py",
        "            for request in batch:\n                request.fail(error)\n",
        "",
        ("tests/test_batching.py::test_a_bug_in_grouping_a_batch_fails_its_requests_at_once",),
    ),
    Mutant(
        "cache: an eviction that ends after its version's unload records its metrics",
        SERVER + "cache.py",
        "hosted.record(lambda: evictions(hosted.name, str(hosted.version), hosted.tier).inc())",
        "evictions(hosted.name, str(hosted.version), hosted.tier).inc()",
        (
            "tests/test_cache_host_tier.py::"
            "test_a_version_unloaded_while_its_weights_are_copied_to_the_host_keeps_nothing",
        ),
    ),
    Mutant(
        "models: an unloaded version is freed on one of asyncio's threads",
        SERVER + "models.py",
        "            await _on(self._frees, hosted.retire)\n        finally:",
        "            await asyncio.to_thread(hosted.retire)\n        finally:",
        ("tests/test_cache_races.py::test_unloads_of_busy_versions_hold_none_of_asyncios_threads",),
    ),
    Mutant(
        "models: a first build's room for its weights gives back the workspace's meanwhile",
        SERVER + "models.py",
        "        wanted = max(nbytes, hosted.device_bytes)",
        "        wanted = nbytes",
        (
            "tests/test_cache_races.py::"
            "test_a_restored_version_whose_workspace_has_no_room_holds_up_no_other_page_in",
        ),
    ),
    Mutant(
        "models: vectors of a model that declares them as rows run alone",
        SERVER + "models.py",
        "vectors_are_rows=bool(runner.inputs),",
        "vectors_are_rows=False,",
        ("tests/test_batching.py::test_vectors_of_a_model_that_declares_them_as_rows_are_merged",),
    ),
    Mutant(
        "batching: a closing batcher waits for the lane to drop the requests of callers that left",
        SERVER + "batching.py",
        "            for request in [r for r in self._queue if r.future.cancelled()]:\n",
        "            for request in [r for r in self._queue if False]:\n",
        ("tests/test_cache_races.py::test_unloads_of_busy_versions_hold_none_of_asyncios_threads",),
    ),
    Mutant(
        "cache: a request for a version a claim drains keeps it on its device",
        SERVER + "cache.py",
        "        await self._while_drained(hosted, deadline)\n",
        "",
        (
            "tests/test_cache_races.py::"
            "test_a_version_whose_room_versions_in_constant_use_hold_claims_it_and_gets_in",
        ),
    ),
    Mutant(
        "cache: no claims (versions in constant use keep a larger one out for good)",
        SERVER + "cache.py",
        "                if claim is None:\n                    self._claim(",
        "                if False:\n                    self._claim(",
        (
            "tests/test_cache_races.py::"
            "test_a_version_whose_room_versions_in_constant_use_hold_claims_it_and_gets_in",
        ),
    ),
    Mutant(
        "cache: a page-in drops its claim and its time waited at each look",
        SERVER + "cache.py",
        "            if not asks_again:\n                self._end_wanting(",
        "            if True:\n                self._end_wanting(",
        (
            "tests/test_cache_races.py::"
            "test_a_version_whose_room_versions_in_constant_use_hold_claims_it_and_gets_in",
        ),
    ),
    Mutant(
        "cache: a device claims again at once after a claim lapsed",
        SERVER + "cache.py",
        " or now < self._no_claim_until.get(where, 0.0):",
        ":",
        (
            "tests/test_cache_races.py::"
            "test_a_claim_that_cannot_drain_lapses_evicts_nothing_and_keeps_its_room_meanwhile",
        ),
    ),
    Mutant(
        "cache: others take the room a claim needs",
        SERVER + "cache.py",
        "        return max(0, claim.nbytes - victims - held)",
        "        return 0",
        (
            "tests/test_cache_races.py::"
            "test_a_claim_that_cannot_drain_lapses_evicts_nothing_and_keeps_its_room_meanwhile",
        ),
    ),
    Mutant(
        "cache: a load or page-in refused for room another claims is not told of the claim",
        SERVER + "cache.py",
        "claimed_by = theirs.key if theirs is not None and self._kept(theirs) else None",
        "claimed_by = None",
        (
            "tests/test_cache_races.py::"
            "test_a_claim_that_cannot_drain_lapses_evicts_nothing_and_keeps_its_room_meanwhile",
        ),
    ),
    Mutant(
        "cache: others evict a claim's victims for room it has claimed",
        SERVER + "cache.py",
        "claimed = {id(h) for h in claim.victims} if claim else set()",
        "claimed = set()",
        (
            "tests/test_cache_races.py::"
            "test_a_claim_that_cannot_drain_lapses_evicts_nothing_and_keeps_its_room_meanwhile",
        ),
    ),
    Mutant(
        "cache: a claim lapses while it copies its versions to the host tier",
        SERVER + "cache.py",
        "                    claim.evicting = enough and all(\n"
        "                        h.tier != RESIDENT or h.retiring or h.idle"
        " for h in claim.victims\n"
        "                    )\n",
        "                    claim.evicting = False\n",
        (
            "tests/test_cache_claims.py::"
            "test_a_claim_does_not_lapse_while_it_copies_its_versions_to_the_host_tier",
        ),
    ),
    Mutant(
        "host: a request for the newest version fails when a rollout unloads the one it waited for",
        SERVER + "host.py",
        "            if version != 0:\n                raise\n",
        "            if True:\n                raise\n",
        (
            "tests/test_cache_claims.py::"
            "test_a_rollout_fails_no_request_whose_version_a_claim_evicted",
        ),
    ),
    Mutant(
        "cache: any claim that evicted nothing bars its device for the whole backoff",
        SERVER + "cache.py",
        "            backoff = max(0.0, drained) * CLAIM_BACKOFF / CLAIM_SECONDS\n",
        "            backoff = CLAIM_BACKOFF\n",
        (
            "tests/test_cache_claims.py::"
            "test_a_claim_whose_requests_left_is_counted_at_once_and_bars_its_device_briefly",
        ),
    ),
    Mutant(
        "cache: a claim whose requests left is dropped only at the device's next look",
        SERVER + "cache.py",
        "            for device in list(self._claims):\n                self._claim_on(device)",
        "            pass",
        (
            "tests/test_cache_claims.py::"
            "test_a_claim_whose_requests_left_is_counted_at_once_and_bars_its_device_briefly",
        ),
    ),
    Mutant(
        "cache: requests a claim holds back wait for it though their version is being unloaded",
        SERVER + "cache.py",
        "            while claim.live and not hosted.retiring and time.monotonic() < until:",
        "            while claim.live and time.monotonic() < until:",
        (
            "tests/test_cache_claims.py::"
            "test_an_unload_of_a_version_a_claim_drains_does_not_wait_for_the_claim",
        ),
    ),
    Mutant(
        "cache: a load whose caller left waits for room and claims it",
        SERVER + "cache.py",
        "                if caller_gone is not None and caller_gone():\n",
        "                if False:\n",
        ("tests/test_cache_claims.py::test_a_load_whose_caller_left_claims_nothing",),
    ),
    Mutant(
        "cache: a claim that found its room elsewhere lets its device claim again at once",
        SERVER + "cache.py",
        '        if outcome == "got_room" and gone:',
        '        if outcome == "got_room":',
        (
            "tests/test_cache_claims.py::"
            "test_a_claim_that_found_room_elsewhere_bars_its_device_as_one_that_evicted_nothing",
        ),
    ),
    Mutant(
        "cache: room other versions make keeps a claim's victims waiting",
        SERVER + "cache.py",
        "                    claim.evicting = enough and all(\n"
        "                        h.tier != RESIDENT or h.retiring or h.idle"
        " for h in claim.victims\n"
        "                    )\n",
        "                    claim.evicting = enough\n",
        (
            "tests/test_cache_claims.py::test_room_made_by_other_versions_does_not_keep_a_claims_victims_waiting",
        ),
    ),
    Mutant(
        "hosted: requests a claim holds back keep their version on its device",
        SERVER + "hosted.py",
        "        held = self._leases > self._parked or self._compiles\n",
        "        held = self._leases or self._compiles\n",
        (
            "tests/test_cache_races.py::test_a_version_whose_room_versions_in_constant_use_hold_claims_it_and_gets_in",
        ),
    ),
    Mutant(
        "host: a request for a model unloaded while it waited for a page-in is told NOT_FOUND",
        SERVER + "host.py",
        "            except ModelNotFound:\n                raise unloaded from None\n",
        "            except ModelNotFound:\n                raise\n",
        (
            "tests/test_cache.py::test_a_version_unloaded_while_its_page_in_waits_answers_unavailable",
        ),
    ),
    Mutant(
        "models: a restored version ignores the device bytes its record says it held",
        SERVER + "models.py",
        "    held = served.device_bytes if limit is None else min(served.device_bytes, limit)\n",
        "    held = weights\n",
        (
            "tests/test_cache_claims.py::test_a_restored_version_claims_its_weights_and_workspace_at_once",
        ),
    ),
    Mutant(
        "models: a restored version counts what its record says beyond the budget",
        SERVER + "models.py",
        "    held = served.device_bytes if limit is None else min(served.device_bytes, limit)\n",
        "    held = served.device_bytes\n",
        (
            "tests/test_restore_record_hostile.py::"
            "test_device_bytes_an_entry_says_beyond_the_budget_are_held_to_it",
        ),
    ),
    Mutant(
        "messages: a record's negative device bytes are taken",
        SERVER + "messages.py",
        "        if info.device_bytes < 0:\n",
        "        if False:\n",
        (
            "tests/test_restore_record_hostile.py::"
            "test_what_an_entry_says_its_version_served_as_is_checked[negative-bytes]",
        ),
    ),
    Mutant(
        "cache: a request retried after its version was unloaded counts twice",
        SERVER + "cache.py",
        "            if not isinstance(error, VersionUnloaded):\n"
        '                self._metrics.cache_requests.labels("miss").inc()\n',
        '            self._metrics.cache_requests.labels("miss").inc()\n',
        (
            "tests/test_cache_claims.py::test_a_rollout_fails_no_request_whose_version_a_claim_evicted",
        ),
    ),
    Mutant(
        "cache: a request whose page-in failed is no cache miss",
        SERVER + "cache.py",
        "            if not isinstance(error, VersionUnloaded):\n",
        "            if False:\n",
        (
            "tests/test_pagein_deadline.py::"
            "test_a_page_in_gives_up_when_every_request_for_it_has_passed_its_deadline",
        ),
    ),
    Mutant(
        "cache: a restored version too large by its record beside pinned ones never pages in",
        SERVER + "cache.py",
        "            if hosted.built or not hosted.workspace_bytes:\n",
        "            if True:\n",
        (
            "tests/test_restore_record_hostile.py::"
            "test_device_bytes_an_entry_says_beyond_the_budget_are_held_to_it",
        ),
    ),
    Mutant(
        "hosted: a record rewritten while a version is unbuilt keeps the capped device bytes",
        SERVER + "hosted.py",
        "device_bytes=max(said, self.device_bytes))",
        "device_bytes=self.device_bytes)",
        (
            "tests/test_restore_record_hostile.py::"
            "test_device_bytes_an_entry_says_beyond_the_budget_are_held_to_it",
        ),
    ),
    Mutant(
        "models: a restored version counts a workspace measured on another kind of device",
        SERVER + "models.py",
        '    if served.device.partition(":")[0] != device.type:\n',
        "    if False:\n",
        (
            "tests/test_restore_record_hostile.py::"
            "test_device_bytes_measured_on_another_kind_of_device_are_not_counted",
        ),
    ),
]


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored files)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        source = ROOT / raw.decode()
        if source.is_file():
            target = dest / raw.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


# Runs pytest in the copy with the copy's packages, not the editable install's.
LAUNCHER = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path[:] = ["client", "server"] + [p for p in sys.path if "__editable__" not in p]
import modelhost.server, pytest
assert modelhost.server.__path__[0].startswith(sys.argv[1]), modelhost.server.__path__
sys.exit(pytest.main(sys.argv[2:]))
"""


def run_tests(tree: Path, tests: tuple[str, ...], *, show: bool = False) -> int:
    """Runs `tests` against `tree`; with `show`, prints the end of what failed."""
    args = [sys.executable, "-c", LAUNCHER, str(tree), "-q", "-x", "-p", "no:cacheprovider"]
    # Servers the tests start as processes import the copy's packages too.
    copy = os.pathsep.join(str(tree / part) for part in ("client", "server"))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": copy}
    done = subprocess.run(
        [*args, *tests], cwd=tree, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    if show and done.returncode:
        print(done.stdout[-6000:], file=sys.stderr)
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-k", action="append", help="only mutations whose name contains this (repeatable: any)"
    )
    wanted = parser.parse_args().k or [""]
    chosen = [m for m in MUTANTS if any(k in m.name for k in wanted)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        clean = Path(scratch) / "clean"
        copy_tree(clean)
        baseline = tuple(dict.fromkeys(test for m in chosen for test in m.tests))
        if run_tests(clean, baseline, show=True) != 0:  # else a failure would not mean "caught"
            print("the tests fail without any mutation: fix them first", file=sys.stderr)
            return 2
        for mutant in chosen:
            tree = Path(scratch) / "tree"
            shutil.copytree(clean, tree)
            source = tree / mutant.path
            text = source.read_text()
            started = time.monotonic()
            if text.count(mutant.old) != 1:
                verdict = "stale"
            else:
                source.write_text(text.replace(mutant.old, mutant.new))
                verdict = "caught" if run_tests(tree, mutant.tests) != 0 else "MISSED"
            rows.append((mutant.name, verdict, time.monotonic() - started))
            print(f"{verdict:7} {rows[-1][2]:6.1f}s  {mutant.name}", flush=True)
            shutil.rmtree(tree)
    print("\n| mutation | verdict | seconds |\n|---|---|---|")
    for name, verdict, seconds in rows:
        print(f"| {name} | {verdict} | {seconds:.0f} |")
    return 0 if all(verdict == "caught" for _, verdict, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
