// The errors the extensions' glue throws for bad input, and the translator that turns them into deepep_plugin's
// Python exceptions (deepep_plugin.errors.DeepEPInputError / DeepEPBufferTooSmall, imported lazily: that module is
// pure Python). Shared by _intranode_C and _nvshmem_C; include from .cpp glue only (it needs pybind11).
#pragma once

#include <pybind11/pybind11.h>

#include <exception>
#include <stdexcept>

namespace deepep {

struct InputError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct BufferTooSmall : InputError {
  using InputError::InputError;
};

// Call once from a module's init.
inline void register_error_translators() {
  pybind11::register_exception_translator([](std::exception_ptr p) {
    if (!p) return;
    try {
      std::rethrow_exception(p);
    } catch (const BufferTooSmall& e) {
      pybind11::object cls = pybind11::module_::import("deepep_plugin.errors").attr("DeepEPBufferTooSmall");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const InputError& e) {
      pybind11::object cls = pybind11::module_::import("deepep_plugin.errors").attr("DeepEPInputError");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
}

}  // namespace deepep
