/*
 * A fake libnvidia-ml for testing Gangway's NVML backend on machines without a GPU.
 *
 * It exports the NVML functions the backend calls, with the C ABI of nvml.h. nvml-wrapper resolves
 * every other symbol lazily (a missing one fails only the call that needs it), so these are enough.
 *
 * Configuration: a file next to the library, "<path of this .so>.conf", found with dladdr and read
 * by nvmlInit_v2, so tests running in parallel each load their own copy of the library (distinct
 * files are distinct dlopen instances, with their own state) with their own configuration.
 * One "key=value" per line ('#' starts a comment); lists are comma-separated, one value per device:
 *
 *   devices=4                    number of GPUs (at most 64)
 *   name=NVIDIA H100 80GB HBM3   name of every device
 *   memory_mib=81559             total memory of every device
 *   util=10,20,30,40             GPU utilization (%)
 *   mem_used_mib=1,2,3,4         memory used
 *   ecc=0,0,5,0                  volatile uncorrected ECC errors
 *   numa=0,0,1,1                 NUMA node (absent: NOT_SUPPORTED)
 *   nvlink=0-1,2-3,4-s0          NVLinks: DEV-DEV (one link on each side) or DEV-sN (a link to
 *                                NVSwitch N); a device with no link answers NOT_SUPPORTED
 *   xid=1:79,2:13                XID events DEV:CODE, delivered once each by nvmlEventSetWait_v2
 *   fail=FUNC[@DEV]:CODE,...     FUNC returns the NVML error CODE (on device DEV only, if given)
 *
 * Local bus ids are "00000000:BB:00.0" with BB = 0x10 + index; NVLink remote ends are reported
 * with a 4-digit domain ("0000:BB:00.0"), as some NVML versions do; switch N is bus 0xC0 + N.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARG 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_UNKNOWN 999

#define MAX_DEVICES 64
#define MAX_LINKS 18
#define MAX_FAILS 32
#define MAX_XIDS 64

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;

struct fake_device;
typedef struct fake_device *nvmlDevice_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

struct fake_event_set {
    unsigned long long registered[MAX_DEVICES];
};
typedef struct fake_event_set *nvmlEventSet_t;

#define nvmlEventTypeSingleBitEccError 1ULL
#define nvmlEventTypeDoubleBitEccError 2ULL
#define nvmlEventTypeXidCriticalError 8ULL

struct fake_device {
    unsigned int util, numa;
    int has_numa;
    unsigned long long mem_used_mib, ecc;
    int links;
    unsigned int remote_bus[MAX_LINKS];
};

static struct fake_device devices[MAX_DEVICES];
static unsigned int device_count;
static char device_name[96] = "NVIDIA H100 80GB HBM3";
static unsigned long long memory_mib = 81559;
static int initialized;

static struct {
    char func[64];
    int device; /* -1: every device */
    int code;
} fails[MAX_FAILS];
static int fail_count;

static struct {
    unsigned int device;
    unsigned long long code;
    int delivered;
} xids[MAX_XIDS];
static int xid_count;

static nvmlReturn_t failure(const char *func, int device) {
    for (int i = 0; i < fail_count; i++) {
        if (strcmp(fails[i].func, func) == 0 && (fails[i].device < 0 || fails[i].device == device)) {
            return fails[i].code;
        }
    }
    return NVML_SUCCESS;
}

static int index_of(nvmlDevice_t device) {
    if (!initialized || device < devices || device >= devices + device_count) {
        return -1;
    }
    return (int)(device - devices);
}

/* Checks the handle and the configured failures of a per-device call. */
#define DEVICE_CALL(func, handle)                                   \
    int index = index_of(handle);                                  \
    if (!initialized) return NVML_ERROR_UNINITIALIZED;              \
    if (index < 0) return NVML_ERROR_INVALID_ARG;                   \
    {                                                              \
        nvmlReturn_t configured = failure(func, index);            \
        if (configured != NVML_SUCCESS) return configured;         \
    }

static void add_link(unsigned int device, unsigned int remote_bus) {
    if (device < MAX_DEVICES && devices[device].links < MAX_LINKS) {
        devices[device].remote_bus[devices[device].links++] = remote_bus;
    }
}

static void parse_list(const char *value, void (*set)(unsigned int index, unsigned long long v)) {
    char *end;
    unsigned int index = 0;
    while (*value && index < MAX_DEVICES) {
        unsigned long long v = strtoull(value, &end, 10);
        if (end == value) break;
        set(index++, v);
        value = *end == ',' ? end + 1 : end;
    }
}

static void set_util(unsigned int i, unsigned long long v) { devices[i].util = (unsigned int)v; }
static void set_mem_used(unsigned int i, unsigned long long v) { devices[i].mem_used_mib = v; }
static void set_ecc(unsigned int i, unsigned long long v) { devices[i].ecc = v; }
static void set_numa(unsigned int i, unsigned long long v) {
    devices[i].numa = (unsigned int)v;
    devices[i].has_numa = 1;
}

/* Lists are split with strtok_r, never strtok: strtok keeps its position in one static of the C
 * library, shared by every copy of this library in the process, so two tests configuring their
 * copies at once would read each other's tokens. */
static void configure(const char *key, char *value) {
    char *rest;
    if (strcmp(key, "devices") == 0) {
        device_count = (unsigned int)strtoul(value, NULL, 10);
        if (device_count > MAX_DEVICES) device_count = MAX_DEVICES;
    } else if (strcmp(key, "name") == 0) {
        snprintf(device_name, sizeof device_name, "%s", value);
    } else if (strcmp(key, "memory_mib") == 0) {
        memory_mib = strtoull(value, NULL, 10);
    } else if (strcmp(key, "util") == 0) {
        parse_list(value, set_util);
    } else if (strcmp(key, "mem_used_mib") == 0) {
        parse_list(value, set_mem_used);
    } else if (strcmp(key, "ecc") == 0) {
        parse_list(value, set_ecc);
    } else if (strcmp(key, "numa") == 0) {
        parse_list(value, set_numa);
    } else if (strcmp(key, "nvlink") == 0) {
        for (char *pair = strtok_r(value, ",", &rest); pair; pair = strtok_r(NULL, ",", &rest)) {
            unsigned int a, b;
            if (sscanf(pair, "%u-s%u", &a, &b) == 2) {
                add_link(a, 0xC0 + b);
            } else if (sscanf(pair, "%u-%u", &a, &b) == 2) {
                add_link(a, 0x10 + b);
                add_link(b, 0x10 + a);
            }
        }
    } else if (strcmp(key, "xid") == 0) {
        for (char *item = strtok_r(value, ",", &rest); item && xid_count < MAX_XIDS; item = strtok_r(NULL, ",", &rest)) {
            if (sscanf(item, "%u:%llu", &xids[xid_count].device, &xids[xid_count].code) == 2) {
                xids[xid_count++].delivered = 0;
            }
        }
    } else if (strcmp(key, "fail") == 0) {
        for (char *item = strtok_r(value, ",", &rest); item && fail_count < MAX_FAILS; item = strtok_r(NULL, ",", &rest)) {
            char *colon = strrchr(item, ':');
            if (!colon) continue;
            *colon = '\0';
            fails[fail_count].code = atoi(colon + 1);
            char *at = strchr(item, '@');
            fails[fail_count].device = at ? atoi(at + 1) : -1;
            if (at) *at = '\0';
            snprintf(fails[fail_count].func, sizeof fails[fail_count].func, "%s", item);
            fail_count++;
        }
    }
}

static void load_config(void) {
    memset(devices, 0, sizeof devices);
    device_count = 0;
    fail_count = 0;
    xid_count = 0;

    Dl_info info;
    if (!dladdr((void *)load_config, &info) || !info.dli_fname) return;
    char path[4096];
    snprintf(path, sizeof path, "%s.conf", info.dli_fname);
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "#\r\n")] = '\0';
        char *eq = strchr(line, '=');
        if (!eq) continue;
        *eq = '\0';
        configure(line, eq + 1);
    }
    fclose(f);
}

nvmlReturn_t nvmlInit_v2(void) {
    load_config();
    nvmlReturn_t configured = failure("nvmlInit_v2", -1);
    if (configured != NVML_SUCCESS) return configured;
    initialized = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    initialized = 0;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARG: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t configured = failure("nvmlDeviceGetCount_v2", -1);
    if (configured != NVML_SUCCESS) return configured;
    if (!count) return NVML_ERROR_INVALID_ARG;
    *count = device_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (index >= device_count || !device) return NVML_ERROR_INVALID_ARG;
    nvmlReturn_t configured = failure("nvmlDeviceGetHandleByIndex_v2", (int)index);
    if (configured != NVML_SUCCESS) return configured;
    *device = &devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *out) {
    DEVICE_CALL("nvmlDeviceGetIndex", device);
    *out = (unsigned int)index;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    DEVICE_CALL("nvmlDeviceGetUUID", device);
    if ((unsigned int)snprintf(uuid, length, "GPU-fa4e0000-0000-4000-8000-%012d", index) >= length) {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    DEVICE_CALL("nvmlDeviceGetName", device);
    if ((unsigned int)snprintf(name, length, "%s", device_name) >= length) {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    DEVICE_CALL("nvmlDeviceGetMemoryInfo_v2", device);
    /* NVML_STRUCT_VERSION(Memory, 2): the caller's struct must be laid out as ours. */
    if (memory->version != (unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24))) {
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    const unsigned long long mib = 1024ULL * 1024ULL;
    memory->total = memory_mib * mib;
    memory->reserved = 0;
    memory->used = devices[index].mem_used_mib * mib;
    memory->free = memory->total - memory->used;
    return NVML_SUCCESS;
}

static void fill_pci(nvmlPciInfo_t *pci, unsigned int bus, int short_domain) {
    memset(pci, 0, sizeof *pci);
    pci->bus = bus;
    pci->pciDeviceId = 0x233010de;
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", bus);
    snprintf(pci->busId, sizeof pci->busId, short_domain ? "0000:%02X:00.0" : "00000000:%02X:00.0",
             bus);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    DEVICE_CALL("nvmlDeviceGetPciInfo_v3", device);
    fill_pci(pci, 0x10 + (unsigned int)index, 0);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNumaNodeId(nvmlDevice_t device, unsigned int *node) {
    DEVICE_CALL("nvmlDeviceGetNumaNodeId", device);
    if (!devices[index].has_numa) return NVML_ERROR_NOT_SUPPORTED;
    *node = devices[index].numa;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, int *is_active) {
    DEVICE_CALL("nvmlDeviceGetNvLinkState", device);
    if (devices[index].links == 0) return NVML_ERROR_NOT_SUPPORTED;
    if (link >= (unsigned int)devices[index].links) return NVML_ERROR_INVALID_ARG;
    *is_active = 1; /* NVML_FEATURE_ENABLED */
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t device, unsigned int link,
                                                 nvmlPciInfo_t *pci) {
    DEVICE_CALL("nvmlDeviceGetNvLinkRemotePciInfo_v2", device);
    if (link >= (unsigned int)devices[index].links) return NVML_ERROR_INVALID_ARG;
    fill_pci(pci, devices[index].remote_bus[link], 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    DEVICE_CALL("nvmlDeviceGetUtilizationRates", device);
    utilization->gpu = devices[index].util;
    utilization->memory = devices[index].util / 2;
    return NVML_SUCCESS;
}

/* error_type 1: NVML_MEMORY_ERROR_TYPE_UNCORRECTED; counter_type 0: NVML_VOLATILE_ECC. */
nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, int error_type, int counter_type,
                                         unsigned long long *count) {
    DEVICE_CALL("nvmlDeviceGetTotalEccErrors", device);
    (void)counter_type;
    *count = error_type == 1 ? devices[index].ecc : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types) {
    DEVICE_CALL("nvmlDeviceGetSupportedEventTypes", device);
    *types = nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError |
             nvmlEventTypeXidCriticalError;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t configured = failure("nvmlEventSetCreate", -1);
    if (configured != NVML_SUCCESS) return configured;
    *set = calloc(1, sizeof **set);
    return *set ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    free(set);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types,
                                      nvmlEventSet_t set) {
    DEVICE_CALL("nvmlDeviceRegisterEvents", device);
    if (!set) return NVML_ERROR_INVALID_ARG;
    set->registered[index] |= types;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!set || !data) return NVML_ERROR_INVALID_ARG;
    for (int i = 0; i < xid_count; i++) {
        unsigned int d = xids[i].device;
        if (!xids[i].delivered && d < device_count &&
            (set->registered[d] & nvmlEventTypeXidCriticalError)) {
            xids[i].delivered = 1;
            memset(data, 0, sizeof *data);
            data->device = &devices[d];
            data->eventType = nvmlEventTypeXidCriticalError;
            data->eventData = xids[i].code;
            return NVML_SUCCESS;
        }
    }
    struct timespec pause = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    nanosleep(&pause, NULL);
    return NVML_ERROR_TIMEOUT;
}
