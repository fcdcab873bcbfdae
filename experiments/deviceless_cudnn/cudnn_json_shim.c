/* libcudnn.so.9 for a deviceless compile: every call goes to the real library
   (libcudnn_real.so.9, a dependency of this one), except that the device properties
   XLA describes as JSON get the keys cuDNN 9.28 requires and jaxlib 0.11.2 does not
   write (smCountOrigin, oversizedSharedMemoryPerBlock, memoryBusWidth), before
   cuDNN reads them. See build.sh. */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

enum { DEVICEPROP_JSON = 2702, TYPE_CHAR = 24 };  /* cudnn_graph.h, cuDNN 9.8+ */
typedef int (*set_attribute)(void *, int, int, long long, const void *);

int cudnnBackendSetAttribute(void *descriptor, int name, int type, long long count,
                             const void *value) {
  static set_attribute real = NULL;
  if (real == NULL) {
    void *library = dlopen("libcudnn_real.so.9", RTLD_NOW | RTLD_LOCAL);
    real = (set_attribute)dlsym(library, "cudnnBackendSetAttribute");
  }
  if (name != DEVICEPROP_JSON || type != TYPE_CHAR || value == NULL)
    return real(descriptor, name, type, count, value);
  const char *json = value;
  const char *extra =
      ",\"smCountOrigin\":0,\"oversizedSharedMemoryPerBlock\":0,\"memoryBusWidth\":6144";
  long long end = count - 1;
  while (end >= 0 && json[end] != '}') --end;
  if (end < 0) return real(descriptor, name, type, count, value);
  long long added = (long long)strlen(extra), n = count + added;
  char *patched = malloc(n);
  memcpy(patched, json, end);
  memcpy(patched + end, extra, added);
  memcpy(patched + end + added, json + end, count - end);
  int status = real(descriptor, name, type, n, patched);
  free(patched);
  return status;
}
