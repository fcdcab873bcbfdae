/* libcuda.so.1 for a machine without a GPU driver: only so that cuDNN's engine
   libraries load. Every call fails (CUDA_ERROR_NO_DEVICE); no kernel is ever loaded.
   See build.sh. */
enum { NO_DEVICE = 100 };
int cuGetErrorString(int error, const char **text) {
  (void)error;
  if (text) *text = "no CUDA driver on this machine (stub)";
  return 0;
}
int cuModuleGetFunction(void *function, void *module, const char *name) { return NO_DEVICE; }
int cuModuleLoadData(void *module, const void *image) { return NO_DEVICE; }
int cuModuleUnload(void *module) { return NO_DEVICE; }
int cuTensorMapEncodeIm2col(void) { return NO_DEVICE; }
int cuTensorMapEncodeTiled(void) { return NO_DEVICE; }
