// A stand-in for the CUDA driver (libcuda.so.1) on a machine without a GPU, for
// scripts/cuda-preflight.sh. It answers as one H100 (sm_90) and does what a real driver does with
// each kernel before it runs: JIT-compiles its PTX to sm_90a machine code (with nvJitLink, the
// driver's own compiler), and checks every launch against the card's limits (threads, registers,
// shared memory, grid). Kernels do not execute: device memory is host memory, copies are memcpy,
// so results are meaningless. What it proves is that every kernel the binary generates on the
// CUDA path compiles for an H100/H200 and can be launched, before a scarce GPU session is spent.
//
// Build: cc -shared -fPIC -O1 -I$CUDA/include -o libcuda.so.1 libcuda.c -L$CUDA/lib -l:libnvJitLink.so.13
// Report: a summary on stderr at exit, and one line per problem as it happens ("fake-cuda: ...").
// FAKE_CUDA_MEMORY_GIB sets the card's memory (default 80 GiB); FAKE_CUDA_USED_FILE names a file
// kept at the MiB allocated, which the stand-in nvidia-smi reports as memory.used.

#include <cuda.h>
#include <nvJitLink.h>

#include <elf.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

// H100 SXM limits (compute capability 9.0).
#define SM_COUNT 132
#define MAX_THREADS 1024
#define MAX_SHARED_OPTIN 232448 // 227 KiB per block with the opt-in attribute
#define DEFAULT_SHARED 49152    // without it
#define REGISTERS_PER_BLOCK 65536

static int problems, kernels_loaded, cubins_loaded, launches;
static double jit_seconds;

static void problem(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "fake-cuda: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    problems++;
}

__attribute__((destructor)) static void summary(void) {
    fprintf(stderr,
            "fake-cuda: %d modules JIT-compiled to sm_90a in %.1f s, %d cubins loaded, %d launches checked, %d problems\n",
            kernels_loaded, jit_seconds, cubins_loaded, launches, problems);
}

// The card's memory: 80 GiB, or FAKE_CUDA_MEMORY_GIB (to see what qpert does when it runs out).
static size_t total_memory(void) {
    const char *gib = getenv("FAKE_CUDA_MEMORY_GIB");
    return gib ? (size_t)(atof(gib) * (1ULL << 30)) : 80ULL << 30;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// ---- device, context ---------------------------------------------------------------------------

CUresult cuInit(unsigned int flags) { (void)flags; return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return CUDA_SUCCESS; }
CUresult cuDeviceGetCount(int *count) { *count = 1; return CUDA_SUCCESS; }
CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *device = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    (void)device;
    snprintf(name, len, "qpert fake CUDA device (H100 limits)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem(size_t *bytes, CUdevice device) { (void)device; *bytes = total_memory(); return CUDA_SUCCESS; }
CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice device) { (void)device; memset(uuid, 7, sizeof *uuid); return CUDA_SUCCESS; }

CUresult cuDeviceGetAttribute(int *value, CUdevice_attribute attribute, CUdevice device) {
    (void)device;
    switch (attribute) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *value = 32; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = MAX_THREADS; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: *value = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *value = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *value = 64; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *value = 2147483647; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: *value = 65535; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *value = 65535; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = SM_COUNT; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *value = DEFAULT_SHARED; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = MAX_SHARED_OPTIN; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *value = 233472; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *value = REGISTERS_PER_BLOCK; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: *value = 65536; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *value = 2048; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR: *value = 32; break;
    case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: *value = 50 << 20; break;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *value = 1980000; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *value = 2619000; break;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *value = 5120; break;
    case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: *value = 65536; break;
    case CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT: *value = 512; break;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING:
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED:
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS:
    case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT:
    case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH:
    case CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH:
    case CU_DEVICE_ATTRIBUTE_TENSOR_MAP_ACCESS_SUPPORTED: *value = 1; break;
    default:
        *value = 0;
        if (getenv("FAKE_CUDA_VERBOSE")) fprintf(stderr, "fake-cuda: attribute %d unknown, answered 0\n", attribute);
    }
    return CUDA_SUCCESS;
}

// One context; its handle is a dummy pointer.
static char the_context;
CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice device) { (void)device; *ctx = (CUcontext)&the_context; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRelease(CUdevice device) { (void)device; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxGetState(CUdevice device, unsigned int *flags, int *active) { (void)device; *flags = 0; *active = 1; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxSetFlags(CUdevice device, unsigned int flags) { (void)device; (void)flags; return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext ctx) { (void)ctx; return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext *ctx) { *ctx = (CUcontext)&the_context; return CUDA_SUCCESS; }
CUresult cuCtxPushCurrent(CUcontext ctx) { (void)ctx; return CUDA_SUCCESS; }
CUresult cuCtxPopCurrent(CUcontext *ctx) { if (ctx) *ctx = (CUcontext)&the_context; return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(CUdevice *device) { *device = 0; return CUDA_SUCCESS; }
CUresult cuCtxSynchronize(void) { return CUDA_SUCCESS; }
CUresult cuCtxGetApiVersion(CUcontext ctx, unsigned int *version) { (void)ctx; *version = 13000; return CUDA_SUCCESS; }
CUresult cuCtxGetStreamPriorityRange(int *least, int *greatest) { *least = 0; *greatest = -5; return CUDA_SUCCESS; }
CUresult cuCtxSetLimit(CUlimit limit, size_t value) { (void)limit; (void)value; return CUDA_SUCCESS; }
CUresult cuCtxGetLimit(size_t *value, CUlimit limit) { (void)limit; *value = 1024; return CUDA_SUCCESS; }

// NVRTC asks the driver it finds for its private tables; without them it compiles alone.
CUresult cuGetExportTable(const void **table, const CUuuid *id) { (void)id; *table = NULL; return CUDA_ERROR_NOT_SUPPORTED; }

CUresult cuGetErrorString(CUresult error, const char **text) {
    *text = error == CUDA_SUCCESS ? "no error" : "fake-cuda: see the fake-cuda lines above";
    return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult error, const char **text) {
    *text = error == CUDA_SUCCESS ? "CUDA_SUCCESS" : "CUDA_ERROR (fake-cuda)";
    return CUDA_SUCCESS;
}

// ---- memory: host memory, lazily zeroed -------------------------------------------------------

static void *map(size_t bytes) {
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

// Sizes of live allocations, to unmap them (a small open-addressing table keyed by address).
#define SLOTS (1 << 20)
static unsigned long long slot_ptr[SLOTS];
static size_t slot_len[SLOTS];
static size_t allocated;

// Writes the MiB allocated to FAKE_CUDA_USED_FILE, if set, in place and at a fixed width, so that a
// reader (the stand-in nvidia-smi, polled by `qpert bench`) never sees a half-written number.
static void publish_allocated(void) {
    static int fd = -2;
    if (fd == -2) {
        const char *path = getenv("FAKE_CUDA_USED_FILE");
        fd = path ? open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644) : -1;
    }
    if (fd < 0) return;
    char line[24];
    int n = snprintf(line, sizeof line, "%-20zu\n", allocated >> 20);
    if (pwrite(fd, line, n, 0) != n) problem("cannot write FAKE_CUDA_USED_FILE");
}
// A new process starts from nothing allocated, not from what the last one left in the file.
__attribute__((constructor)) static void publish_nothing_allocated(void) { publish_allocated(); }

static CUresult allocate(CUdeviceptr *ptr, size_t bytes) {
    if (allocated + bytes > total_memory()) return CUDA_ERROR_OUT_OF_MEMORY;
    void *p = map(bytes);
    if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
    *ptr = (CUdeviceptr)p;
    for (size_t i = ((unsigned long long)p >> 12) % SLOTS;; i = (i + 1) % SLOTS)
        if (!slot_ptr[i]) { slot_ptr[i] = *ptr; slot_len[i] = bytes; break; }
    allocated += bytes;
    publish_allocated();
    return CUDA_SUCCESS;
}
static CUresult release(CUdeviceptr ptr) {
    if (!ptr) return CUDA_SUCCESS;
    for (size_t i = (ptr >> 12) % SLOTS, n = 0; n < SLOTS; i = (i + 1) % SLOTS, n++)
        if (slot_ptr[i] == ptr) {
            munmap((void *)ptr, slot_len[i] ? slot_len[i] : 1);
            allocated -= slot_len[i];
            publish_allocated();
            slot_ptr[i] = 0; // linear probing: a freed slot may break later chains, so re-insert them
            for (size_t j = (i + 1) % SLOTS; slot_ptr[j]; j = (j + 1) % SLOTS) {
                unsigned long long p = slot_ptr[j]; size_t l = slot_len[j];
                slot_ptr[j] = 0;
                for (size_t k = (p >> 12) % SLOTS;; k = (k + 1) % SLOTS)
                    if (!slot_ptr[k]) { slot_ptr[k] = p; slot_len[k] = l; break; }
            }
            return CUDA_SUCCESS;
        }
    problem("free of %#llx, which was never allocated", ptr);
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult cuMemAlloc(CUdeviceptr *ptr, size_t bytes) { return allocate(ptr, bytes); }
CUresult cuMemAllocAsync(CUdeviceptr *ptr, size_t bytes, CUstream s) { (void)s; return allocate(ptr, bytes); }
CUresult cuMemAllocFromPoolAsync(CUdeviceptr *ptr, size_t bytes, CUmemoryPool pool, CUstream s) { (void)pool; (void)s; return allocate(ptr, bytes); }
CUresult cuMemFree(CUdeviceptr ptr) { return release(ptr); }
CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream s) { (void)s; return release(ptr); }
CUresult cuMemAllocHost(void **ptr, size_t bytes) { *ptr = map(bytes); return *ptr ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY; }
CUresult cuMemHostAlloc(void **ptr, size_t bytes, unsigned int flags) { (void)flags; return cuMemAllocHost(ptr, bytes); }
CUresult cuMemFreeHost(void *ptr) { (void)ptr; return CUDA_SUCCESS; } // leaked: its size is unknown here
CUresult cuMemGetInfo(size_t *free_bytes, size_t *total) {
    *total = total_memory();
    *free_bytes = allocated < *total ? *total - allocated : 0;
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoD(CUdeviceptr dst, const void *src, size_t n) { memcpy((void *)dst, src, n); return CUDA_SUCCESS; }
CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void *src, size_t n, CUstream s) { (void)s; return cuMemcpyHtoD(dst, src, n); }
CUresult cuMemcpyDtoH(void *dst, CUdeviceptr src, size_t n) { memcpy(dst, (void *)src, n); return CUDA_SUCCESS; }
CUresult cuMemcpyDtoHAsync(void *dst, CUdeviceptr src, size_t n, CUstream s) { (void)s; return cuMemcpyDtoH(dst, src, n); }
CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t n) { memmove((void *)dst, (void *)src, n); return CUDA_SUCCESS; }
CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) { (void)s; return cuMemcpyDtoD(dst, src, n); }
CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) { (void)s; return cuMemcpyDtoD(dst, src, n); }
CUresult cuMemcpy2DAsync(const CUDA_MEMCPY2D *copy, CUstream s) {
    (void)s;
    const char *src = copy->srcMemoryType == CU_MEMORYTYPE_HOST ? copy->srcHost : (const char *)copy->srcDevice;
    char *dst = copy->dstMemoryType == CU_MEMORYTYPE_HOST ? copy->dstHost : (char *)copy->dstDevice;
    src += copy->srcY * copy->srcPitch + copy->srcXInBytes;
    dst += copy->dstY * copy->dstPitch + copy->dstXInBytes;
    for (size_t row = 0; row < copy->Height; row++)
        memcpy(dst + row * copy->dstPitch, src + row * copy->srcPitch, copy->WidthInBytes);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8(CUdeviceptr dst, unsigned char v, size_t n) { memset((void *)dst, v, n); return CUDA_SUCCESS; }
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) { (void)s; return cuMemsetD8(dst, v, n); }
CUresult cuMemsetD32(CUdeviceptr dst, unsigned int v, size_t n) {
    for (size_t i = 0; i < n; i++) ((unsigned int *)dst)[i] = v;
    return CUDA_SUCCESS;
}
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int v, size_t n, CUstream s) { (void)s; return cuMemsetD32(dst, v, n); }
CUresult cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr ptr) {
    (void)ptr;
    if (attribute == CU_POINTER_ATTRIBUTE_MEMORY_TYPE) *(unsigned int *)data = CU_MEMORYTYPE_DEVICE;
    else if (attribute == CU_POINTER_ATTRIBUTE_CONTEXT) *(CUcontext *)data = (CUcontext)&the_context;
    else memset(data, 0, sizeof(int));
    return CUDA_SUCCESS;
}
CUresult cuMemHostRegister(void *p, size_t n, unsigned int flags) { (void)p; (void)n; (void)flags; return CUDA_SUCCESS; }
CUresult cuMemHostUnregister(void *p) { (void)p; return CUDA_SUCCESS; }

// ---- streams, events, graphs: everything is already done ---------------------------------------

static char a_stream, an_event, a_graph;
CUresult cuStreamCreate(CUstream *s, unsigned int flags) { (void)flags; *s = (CUstream)&a_stream; return CUDA_SUCCESS; }
CUresult cuStreamCreateWithPriority(CUstream *s, unsigned int flags, int priority) { (void)priority; return cuStreamCreate(s, flags); }
CUresult cuStreamDestroy(CUstream s) { (void)s; return CUDA_SUCCESS; }
CUresult cuStreamSynchronize(CUstream s) { (void)s; return CUDA_SUCCESS; }
CUresult cuStreamQuery(CUstream s) { (void)s; return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned int flags) { (void)s; (void)e; (void)flags; return CUDA_SUCCESS; }
CUresult cuStreamBeginCapture(CUstream s, CUstreamCaptureMode mode) { (void)s; (void)mode; return CUDA_SUCCESS; }
CUresult cuStreamEndCapture(CUstream s, CUgraph *graph) { (void)s; *graph = (CUgraph)&a_graph; return CUDA_SUCCESS; }
CUresult cuGraphGetNodes(CUgraph g, CUgraphNode *nodes, size_t *count) { (void)g; (void)nodes; *count = 0; return CUDA_SUCCESS; }
CUresult cuGraphNodeGetType(CUgraphNode node, CUgraphNodeType *type) { (void)node; *type = CU_GRAPH_NODE_TYPE_KERNEL; return CUDA_SUCCESS; }
CUresult cuGraphInstantiateWithFlags(CUgraphExec *exec, CUgraph g, unsigned long long flags) { (void)g; (void)flags; *exec = (CUgraphExec)&a_graph; return CUDA_SUCCESS; }
CUresult cuGraphUpload(CUgraphExec exec, CUstream s) { (void)exec; (void)s; return CUDA_SUCCESS; }
CUresult cuGraphLaunch(CUgraphExec exec, CUstream s) { (void)exec; (void)s; return CUDA_SUCCESS; }
CUresult cuGraphExecDestroy(CUgraphExec exec) { (void)exec; return CUDA_SUCCESS; }
CUresult cuGraphDestroy(CUgraph g) { (void)g; return CUDA_SUCCESS; }
CUresult cuEventCreate(CUevent *e, unsigned int flags) { (void)flags; *e = (CUevent)&an_event; return CUDA_SUCCESS; }
CUresult cuEventDestroy(CUevent e) { (void)e; return CUDA_SUCCESS; }
CUresult cuEventRecord(CUevent e, CUstream s) { (void)e; (void)s; return CUDA_SUCCESS; }
CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned int flags) { (void)e; (void)s; (void)flags; return CUDA_SUCCESS; }
CUresult cuEventSynchronize(CUevent e) { (void)e; return CUDA_SUCCESS; }
CUresult cuEventQuery(CUevent e) { (void)e; return CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float *ms, CUevent start, CUevent end) { (void)start; (void)end; *ms = 1.0f; return CUDA_SUCCESS; }

// ---- modules and kernels: JIT-compile the PTX as the driver would, check launches --------------

// A kernel: its name and what the JIT said it needs.
typedef struct {
    char name[512];
    int registers;       // per thread
    int static_shared;   // bytes
    int dynamic_limit;   // bytes of dynamic shared memory allowed (raised by cuFuncSetAttribute)
    int spills;          // bytes of spill stores
} Kernel;

// ptxas's info log for one entry: "Compiling entry function 'NAME'", then "N bytes spill stores",
// "Used N registers, ... N bytes smem".
static void read_info_log(const char *log, Kernel *k) {
    char key[600];
    snprintf(key, sizeof key, "entry function '%s'", k->name);
    const char *at = strstr(log, key);
    if (!at) return;
    const char *next = strstr(at + 1, "Compiling entry function");
    const char *spill = strstr(at, "bytes spill stores");
    if (spill && (!next || spill < next)) {
        const char *p = spill;
        while (p > at && p[-1] == ' ') p--;
        while (p > at && p[-1] >= '0' && p[-1] <= '9') p--;
        k->spills = atoi(p);
    }
    const char *used = strstr(at, "Used ");
    if (used && (!next || used < next)) k->registers = atoi(used + 5);
    const char *smem = strstr(at, "bytes smem");
    if (smem && (!next || smem < next)) {
        const char *p = smem;
        while (p > at && p[-1] == ' ') p--;
        while (p > at && p[-1] >= '0' && p[-1] <= '9') p--;
        k->static_shared = atoi(p);
    }
}

// A loaded module: PTX and the JIT's info log, or a cubin (scripts/cubin_seed.py makes them).
typedef struct {
    char *ptx;
    char *info;
    unsigned char *cubin;
} Module;

// A cubin's size: its ELF headers say where its section and program header tables end.
static size_t elf_size(const unsigned char *image) {
    const Elf64_Ehdr *h = (const Elf64_Ehdr *)image;
    size_t sections = h->e_shoff + (size_t)h->e_shnum * h->e_shentsize;
    size_t program = h->e_phoff + (size_t)h->e_phnum * h->e_phentsize;
    return sections > program ? sections : program;
}

static const Elf64_Shdr *elf_section(const unsigned char *image, const char *name) {
    const Elf64_Ehdr *h = (const Elf64_Ehdr *)image;
    const Elf64_Shdr *sections = (const Elf64_Shdr *)(image + h->e_shoff);
    const char *names = (const char *)image + sections[h->e_shstrndx].sh_offset;
    for (int i = 0; i < h->e_shnum; i++)
        if (strcmp(names + sections[i].sh_name, name) == 0) return &sections[i];
    return NULL;
}

// What the JIT's info log says for PTX, read from a cubin: the kernel's register count is an
// EIATTR_REGCOUNT record (0x2f: symbol, count) in .nv.info, keyed by the symbol that its
// .text.NAME section names in sh_info; its static shared memory is the size of .nv.shared.NAME.
static int read_cubin(const unsigned char *image, const char *name, int *registers, int *static_shared) {
    char section[600];
    snprintf(section, sizeof section, ".text.%s", name);
    const Elf64_Shdr *text = elf_section(image, section);
    if (!text) return 0;
    snprintf(section, sizeof section, ".nv.shared.%s", name);
    const Elf64_Shdr *shared = elf_section(image, section);
    *static_shared = shared ? (int)shared->sh_size : 0;
    const Elf64_Shdr *info = elf_section(image, ".nv.info");
    for (size_t at = 0; info && at + 4 <= info->sh_size;) {
        const unsigned char *record = image + info->sh_offset + at;
        unsigned format = record[0], attribute = record[1], size = record[2] | record[3] << 8;
        if (format == 4) { // a value with a size: (symbol, count) for 0x2f
            unsigned symbol, count;
            memcpy(&symbol, record + 4, 4);
            memcpy(&count, record + 8, 4);
            if (attribute == 0x2f && symbol == text->sh_info) *registers = (int)count;
            at += 4 + size;
        } else {
            at += format == 1 ? 2 : 4;
        }
    }
    return 1;
}

CUresult cuModuleLoadData(CUmodule *module, const void *image) {
    double t0 = now();
    nvJitLinkHandle handle;
    const char *options[] = {"-arch=sm_90a", "-verbose"};
    size_t info_size = 0;
    CUresult result = CUDA_SUCCESS;
    if (nvJitLinkCreate(&handle, 2, options) != NVJITLINK_SUCCESS) {
        problem("nvJitLinkCreate failed");
        return CUDA_ERROR_JIT_COMPILER_NOT_FOUND;
    }
    Module *m = calloc(1, sizeof *m);
    if (memcmp(image, ELFMAG, SELFMAG) == 0) {
        // A cubin: CUDA machine code (e_machine EM_CUDA) for SM 90 (bits 8-15 of e_flags; a
        // cubin runs only on its own major version), and linkable, as the driver would check.
        const Elf64_Ehdr *header = image;
        size_t size = elf_size(image);
        unsigned sm = header->e_flags >> 8 & 0xff;
        if (header->e_machine != EM_CUDA || sm != 90) {
            problem("a cubin for machine %u, SM %u, does not load on an H100 (SM 90)", header->e_machine, sm);
            result = CUDA_ERROR_NO_BINARY_FOR_GPU;
        } else if (nvJitLinkAddData(handle, NVJITLINK_INPUT_CUBIN, image, size, "kernel") != NVJITLINK_SUCCESS ||
                   nvJitLinkComplete(handle) != NVJITLINK_SUCCESS) {
            problem("a cubin does not link for sm_90a");
            result = CUDA_ERROR_INVALID_IMAGE;
        }
        m->cubin = malloc(size);
        memcpy(m->cubin, image, size);
        cubins_loaded++;
    } else {
        const char *ptx = image;
        if (nvJitLinkAddData(handle, NVJITLINK_INPUT_PTX, ptx, strlen(ptx) + 1, "kernel") != NVJITLINK_SUCCESS ||
            nvJitLinkComplete(handle) != NVJITLINK_SUCCESS) {
            size_t n = 0;
            nvJitLinkGetErrorLogSize(handle, &n);
            char *log = calloc(n + 1, 1);
            nvJitLinkGetErrorLog(handle, log);
            const char *entry = strstr(ptx, ".entry ");
            problem("PTX does not compile for sm_90a (%.80s...): %s", entry ? entry + 7 : "?", log);
            free(log);
            result = CUDA_ERROR_INVALID_PTX;
        }
        m->ptx = strdup(ptx);
        nvJitLinkGetInfoLogSize(handle, &info_size);
        m->info = calloc(info_size + 1, 1);
        nvJitLinkGetInfoLog(handle, m->info);
        kernels_loaded++;
    }
    nvJitLinkDestroy(&handle);
    jit_seconds += now() - t0;
    *module = (CUmodule)m;
    return result;
}
CUresult cuModuleLoadDataEx(CUmodule *module, const void *image, unsigned int n, CUjit_option *o, void **v) {
    (void)n; (void)o; (void)v;
    return cuModuleLoadData(module, image);
}
CUresult cuModuleUnload(CUmodule module) {
    Module *m = (Module *)module;
    free(m->ptx); free(m->info); free(m->cubin); free(m);
    return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction *function, CUmodule module, const char *name) {
    Module *m = (Module *)module;
    Kernel *k = calloc(1, sizeof *k);
    snprintf(k->name, sizeof k->name, "%s", name);
    k->dynamic_limit = DEFAULT_SHARED;
    if (m->cubin) {
        if (!read_cubin(m->cubin, name, &k->registers, &k->static_shared)) {
            problem("kernel %s is not in its cubin", name);
            free(k);
            return CUDA_ERROR_NOT_FOUND;
        }
    } else {
        char entry[600];
        snprintf(entry, sizeof entry, ".entry %s(", name);
        if (!strstr(m->ptx, entry)) {
            snprintf(entry, sizeof entry, ".entry %s", name);
            if (!strstr(m->ptx, entry)) {
                problem("kernel %s is not in its module", name);
                free(k);
                return CUDA_ERROR_NOT_FOUND;
            }
        }
        read_info_log(m->info, k);
    }
    if (k->spills > 0 && getenv("FAKE_CUDA_VERBOSE"))
        fprintf(stderr, "fake-cuda: %s spills %d bytes (%d registers)\n", name, k->spills, k->registers);
    *function = (CUfunction)k;
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction function, CUfunction_attribute attribute, int value) {
    Kernel *k = (Kernel *)function;
    if (attribute == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
        if (value + k->static_shared > MAX_SHARED_OPTIN) {
            problem("%s asks for %d bytes of dynamic shared memory (+%d static), over the %d of an H100",
                    k->name, value, k->static_shared, MAX_SHARED_OPTIN);
            return CUDA_ERROR_INVALID_VALUE;
        }
        k->dynamic_limit = value;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int *value, CUfunction_attribute attribute, CUfunction function) {
    Kernel *k = (Kernel *)function;
    switch (attribute) {
    case CU_FUNC_ATTRIBUTE_NUM_REGS: *value = k->registers; break;
    case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *value = k->static_shared; break;
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = MAX_THREADS; break;
    case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *value = k->dynamic_limit; break;
    default: *value = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncSetCacheConfig(CUfunction f, CUfunc_cache config) { (void)f; (void)config; return CUDA_SUCCESS; }

/// The checks the driver makes before a launch, and what it answers when one fails.
static CUresult check_launch(Kernel *k, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, unsigned shared) {
    launches++;
    unsigned long long threads = (unsigned long long)bx * by * bz;
    if (!gx || !gy || !gz || !bx || !by || !bz || gy > 65535 || gz > 65535 || bx > 1024 || by > 1024 || bz > 64 ||
        threads > MAX_THREADS) {
        problem("%s launched with grid (%u,%u,%u), block (%u,%u,%u): outside an H100's limits", k->name, gx, gy, gz,
                bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    // Registers are allocated per warp in units of 256.
    unsigned long long warps = (threads + 31) / 32;
    unsigned long long per_warp = ((unsigned long long)k->registers * 32 + 255) / 256 * 256;
    if (warps * per_warp > REGISTERS_PER_BLOCK) {
        problem("%s: %llu threads x %d registers do not fit the %d registers of a block (launch out of resources)",
                k->name, threads, k->registers, REGISTERS_PER_BLOCK);
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    }
    if ((int)shared > k->dynamic_limit) {
        problem("%s launched with %u bytes of dynamic shared memory, over its limit of %d", k->name, shared,
                k->dynamic_limit);
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, CUstream s, void **params, void **extra) {
    (void)s; (void)params; (void)extra;
    return check_launch((Kernel *)f, gx, gy, gz, bx, by, bz, shared);
}
CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
    (void)params; (void)extra;
    return check_launch((Kernel *)f, config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX,
                        config->blockDimY, config->blockDimZ, config->sharedMemBytes);
}
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int *blocks, CUfunction f, int threads, size_t shared) {
    (void)f; (void)threads; (void)shared;
    *blocks = 1;
    return CUDA_SUCCESS;
}

// TMA descriptors: the driver validates and encodes them on the host; its documented checks on the
// layout (address, strides, box and pixel counts) are repeated here.
static CUresult check_tensor_map(const char *what, cuuint32_t rank, cuuint32_t min_rank, void *address,
                                 const cuuint64_t *strides, const cuuint32_t *element_strides) {
    if (rank < min_rank || rank > 5 || ((unsigned long long)address & 15)) {
        problem("%s: rank %u, address %p (rank must be %u..5, the address 16-byte aligned)", what, rank, address,
                min_rank);
        return CUDA_ERROR_INVALID_VALUE;
    }
    for (cuuint32_t i = 0; i + 1 < rank; i++)
        if (strides[i] % 16 || strides[i] >= (1ULL << 40)) {
            problem("%s: stride %llu is not a multiple of 16 bytes below 2^40", what, (unsigned long long)strides[i]);
            return CUDA_ERROR_INVALID_VALUE;
        }
    for (cuuint32_t i = 0; i < rank; i++)
        if (element_strides[i] < 1 || element_strides[i] > 8) {
            problem("%s: element stride %u out of 1..8", what, element_strides[i]);
            return CUDA_ERROR_INVALID_VALUE;
        }
    return CUDA_SUCCESS;
}

CUresult cuTensorMapEncodeTiled(CUtensorMap *map, CUtensorMapDataType type, cuuint32_t rank, void *address,
                                const cuuint64_t *dims, const cuuint64_t *strides, const cuuint32_t *box,
                                const cuuint32_t *element_strides, CUtensorMapInterleave interleave,
                                CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill fill) {
    (void)type; (void)dims; (void)interleave; (void)swizzle; (void)l2; (void)fill;
    CUresult result = check_tensor_map("cuTensorMapEncodeTiled", rank, 1, address, strides, element_strides);
    if (result != CUDA_SUCCESS) return result;
    for (cuuint32_t i = 0; i < rank; i++)
        if (box[i] < 1 || box[i] > 256) {
            problem("cuTensorMapEncodeTiled: box size %u out of 1..256", box[i]);
            return CUDA_ERROR_INVALID_VALUE;
        }
    memset(map, 0, sizeof *map);
    return CUDA_SUCCESS;
}

static CUresult check_im2col(const char *what, cuuint32_t channels, cuuint32_t pixels) {
    if (channels < 1 || channels > 256 || pixels < 1 || pixels > 1024) {
        problem("%s: %u channels per pixel (1..256), %u pixels per column (1..1024)", what, channels, pixels);
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

CUresult cuTensorMapEncodeIm2col(CUtensorMap *map, CUtensorMapDataType type, cuuint32_t rank, void *address,
                                 const cuuint64_t *dims, const cuuint64_t *strides, const int *lower, const int *upper,
                                 cuuint32_t channels, cuuint32_t pixels, const cuuint32_t *element_strides,
                                 CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                 CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill fill) {
    (void)type; (void)dims; (void)lower; (void)upper; (void)interleave; (void)swizzle; (void)l2; (void)fill;
    CUresult result = check_tensor_map("cuTensorMapEncodeIm2col", rank, 3, address, strides, element_strides);
    if (result == CUDA_SUCCESS) result = check_im2col("cuTensorMapEncodeIm2col", channels, pixels);
    if (result == CUDA_SUCCESS) memset(map, 0, sizeof *map);
    return result;
}

CUresult cuTensorMapEncodeIm2colWide(CUtensorMap *map, CUtensorMapDataType type, cuuint32_t rank, void *address,
                                     const cuuint64_t *dims, const cuuint64_t *strides, int lower, int upper,
                                     cuuint32_t channels, cuuint32_t pixels, const cuuint32_t *element_strides,
                                     CUtensorMapInterleave interleave, CUtensorMapIm2ColWideMode mode,
                                     CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2,
                                     CUtensorMapFloatOOBfill fill) {
    (void)type; (void)dims; (void)lower; (void)upper; (void)interleave; (void)mode; (void)swizzle; (void)l2;
    (void)fill;
    CUresult result = check_tensor_map("cuTensorMapEncodeIm2colWide", rank, 3, address, strides, element_strides);
    if (result == CUDA_SUCCESS) result = check_im2col("cuTensorMapEncodeIm2colWide", channels, pixels);
    if (result == CUDA_SUCCESS) memset(map, 0, sizeof *map);
    return result;
}
