// pybind11 module deepforcing_kernels._C: exposes the kernels in csrc/ to Python.
#include <torch/extension.h>

#include "../csrc/build_info.h"
#include "../csrc/cache_ops.h"
#include "../csrc/checks.h"
#include "../csrc/pass_ops.h"
#include "../csrc/sink_attention_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deepforcing_kernels C++ kernels";
  // sink_attention_fwd / sink_rephase_keys take float32 rotation tables (cos, sin, rot_len), not shifts
  m.attr("TABLES_API") = true;
  // sink_attention_fwd takes an optional key_bias [B or 1, Hq or 1, Lk] float32 after mass_end
  m.attr("KEY_BIAS_API") = true;
  // the rotation tables may be per KV head: [Hkv, T] and [B, Lk, Hkv, T]
  m.attr("HEAD_TABLES_API") = true;
  m.def("version", &deepforcing::version, "version the extension was built as");
  m.def("has_openmp", &deepforcing::has_openmp, "whether the extension was compiled with OpenMP");
  m.def("max_threads", &deepforcing::max_threads, "ATen intra-op threads available to the kernels");
  m.def("frame_sums", &deepforcing::frame_sums, "per-frame float32 sums of a [B, F*n, H, D] block (one thread)");
  // copy_slots / move_slots / compact_slots: the cache's slot moves on the calling thread
  m.attr("SLOT_API") = true;
  m.def("copy_slots", &deepforcing::copy_slots, "dst[:, offset:offset+n] = src on slot tensors (one thread)");
  m.def("move_slots", &deepforcing::move_slots, "t[:, dst:dst+count] = t[:, src:src+count], a memmove (one thread)");
  m.def("compact_slots", &deepforcing::compact_slots, "the Top-C compaction of slot tensors in place (one thread)");
  m.def("all_finite", &deepforcing::all_finite, "whether contiguous CPU tensors hold no NaN / inf (one thread)");
  // PreparedPass / head_sum / compress_pass: a cache layer's passes as single calls (csrc/pass_ops.h)
  m.attr("PASS_API") = true;
  py::class_<deepforcing::PreparedPass>(m, "PreparedPass")
      .def(py::init<at::Tensor, at::Tensor, int64_t, int64_t, at::Tensor, at::Tensor, int64_t, bool, double,
                    std::vector<int64_t>, bool, bool, int64_t, int64_t, std::optional<at::Tensor>>(),
           py::arg("k_store"), py::arg("v_store"), py::arg("write_offset"), py::arg("length"), py::arg("cos"),
           py::arg("sin"), py::arg("rot_len"), py::arg("interleaved"), py::arg("softmax_scale"), py::arg("q_shape"),
           py::arg("check_finite"), py::arg("return_mass"), py::arg("mass_start"), py::arg("mass_end"),
           py::arg("carry") = py::none())
      .def("run", &deepforcing::PreparedPass::run,
           "check, write k / v and attend (None, with nothing changed, when the inputs do not fit)")
      .def("attend", &deepforcing::PreparedPass::attend, "the attention alone: (out, mass or empty)");
  m.def("write_block", &deepforcing::write_block, "a new block's K/V, source frames and zeroed per-slot buffers",
        py::arg("k_store"), py::arg("v_store"), py::arg("frames"), py::arg("extras"), py::arg("offset"), py::arg("k"),
        py::arg("v"), py::arg("first_frame"), py::arg("block_frames"));
  m.def("head_sum", &deepforcing::head_sum, "out[:, :n] (+)= mass[:, :, start:start+n].sum(1) in torch's order",
        py::arg("mass"), py::arg("start"), py::arg("n"), py::arg("out"), py::arg("accumulate"));
  m.def("compress_pass", &deepforcing::compress_pass, "Participative Compression of slots [0, end) in place",
        py::arg("slot_tensors"), py::arg("reuse"), py::arg("mass"), py::arg("carried"), py::arg("sink_tokens"),
        py::arg("topc_tokens"), py::arg("recent_tokens"), py::arg("end"), py::arg("max_reuse"));
  m.def("sink_attention_fwd", &deepforcing::sink_attention_fwd,
        "Fused sink attention forward on CPU with precomputed float32 rotation tables: (out, lse, mass-or-empty). "
        "See csrc/sink_attention_cpu.h.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("rot_len"),
        py::arg("interleaved"), py::arg("softmax_scale"), py::arg("return_mass"), py::arg("mass_start"),
        py::arg("mass_end"), py::arg("key_bias") = py::none());
  m.def("sink_rephase_keys", &deepforcing::sink_rephase_keys,
        "Keys as the CPU kernel sees them (fp32, re-phased by the same tables): a test hook for the re-phase step.",
        py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("rot_len"), py::arg("interleaved"));
  m.def("sink_attention_set_block_rows", &deepforcing::set_block_rows,
        "Query rows per task of the CPU kernel (0 = automatic); for tuning and tests.", py::arg("rows"));
  m.def("sink_attention_set_bf16_gemm", &deepforcing::set_bf16_gemm,
        "Allow (default) or forbid the bf16 micro-kernel path for bf16 inputs; for tests and benchmarks.",
        py::arg("enabled"));
  m.def("sink_attention_bf16_gemm_active", &deepforcing::bf16_gemm_active,
        "Whether bf16 inputs currently run on the bf16 micro-kernel (else: converted to fp32).");
  m.def("sink_attention_set_f32_microkernel", &deepforcing::set_f32_microkernel,
        "Force oneDNN's fp32 micro-kernel (True) or BLAS sgemm (False), or None: the CPU's faster one (default; "
        "micro-kernel on AVX-512, sgemm on AVX2); for tests and benchmarks.",
        py::arg("enabled") = py::none());
  m.def("sink_attention_f32_microkernel_active", &deepforcing::f32_microkernel_active,
        "Whether fp32 products currently run on oneDNN's fp32 micro-kernel.");
  m.def("sink_attention_f32_microkernel_for", &deepforcing::f32_microkernel_for,
        "Whether an fp32 call of `query_rows` query rows takes oneDNN's fp32 micro-kernel (the automatic choice "
        "depends on the block's height on AVX2 CPUs).", py::arg("query_rows"));
  m.def("sink_attention_get_block_rows", &deepforcing::get_block_rows, "Current forced block rows (0 = automatic).");
}
