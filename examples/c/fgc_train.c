/* fgc_train: trains a folder compiled by fgcompile on onnxruntime's C API -- the loop a device runs.

   usage: fgc_train [--lr N] [--seed S] [--threads T] OUT/train.onnx RUN_DIR STEPS FINAL_DIR

   RUN_DIR holds manifest.txt and raw little-endian, C-ordered tensors (export_run.py writes them):
       format fgc-c-run/1
       batches K
       data   x      float32 x.bin       4 32 1 8 8    role name dtype file rank dims (one batch: the
       labels labels int64   labels.bin  1 32          data and labels files hold K batches each)
       state  NAME   int16   state_0.bin 2 10 64       one line per trained state tensor
   Step k = 0 .. STEPS-1 feeds batch k mod K, the int32 scalars seed, step = k and lr, and the state;
   it keeps the outputs NAME__next as the next state only if `loss` is finite (README.md of the
   repository: "The training graph's I/O contract"). seed and lr default to the contract's (spec.seed,
   lr_numerator.default). The final state is written to FINAL_DIR, one raw file per state tensor, named
   as in the manifest; existing files are never overwritten. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "onnxruntime_c_api.h"

#define MAX_TENSORS 64
#define MAX_RANK 8
#define FORMAT "fgc-c-run/1"
#define CONTRACT "fgcompile-train/2"

typedef struct {
  char role[16], name[256], dtype[16], file[256];
  int64_t shape[MAX_RANK];
  size_t rank, bytes;              /* bytes of one tensor (of one batch, for data and labels) */
  ONNXTensorElementDataType type;
  char *data;                      /* the whole file */
  OrtValue *value;                 /* state: the current state tensor */
} Entry;

static const OrtApi *ort;

static void die(const char *fmt, ...) {
  va_list ap;
  fputs("fgc_train: error: ", stderr);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(1);
}

static void check(OrtStatus *status, const char *what) {
  if (status) die("%s: onnxruntime says: %s", what, ort->GetErrorMessage(status));
}

static const struct { const char *name; ONNXTensorElementDataType type; size_t size; } DTYPES[] = {
    {"float32", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 4}, {"int64", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 8},
    {"int32", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, 4},   {"int16", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16, 2},
    {"uint16", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, 2}, {"int8", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, 1},
    {"uint8", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 1}};

static long long parse_int(const char *text, long long lo, long long hi, const char *what) {
  char *end;
  errno = 0;
  long long v = strtoll(text, &end, 10);
  if (*text == '\0' || *end != '\0' || errno || v < lo || v > hi)
    die("%s %s: expected a whole number in [%lld, %lld].", what, text, lo, hi);
  return v;
}

static char *read_file(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (!f) die("%s: cannot open it (%s).", path, strerror(errno));
  if (fseek(f, 0, SEEK_END) != 0) die("%s: cannot read it (%s).", path, strerror(errno));
  long n = ftell(f);
  rewind(f);
  char *buf = malloc(n > 0 ? (size_t)n + 1 : 1);
  if (n < 0 || !buf || fread(buf, 1, (size_t)n, f) != (size_t)n) die("%s: cannot read it.", path);
  fclose(f);
  buf[n] = '\0';
  *size = (size_t)n;
  return buf;
}

/* The entries of RUN_DIR/manifest.txt, each with its file read and its size checked; sets *batches. */
static size_t read_manifest(const char *dir, Entry *entries, long long *batches) {
  char path[1024], *line, *save;
  size_t size, n = 0, lineno = 0;
  snprintf(path, sizeof path, "%s/manifest.txt", dir);
  char *text = read_file(path, &size);
  int format_ok = 0;
  *batches = 0;
  for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    char *tok[4 + MAX_RANK + 2], *s2;
    size_t t = 0;
    lineno++;
    for (char *w = strtok_r(line, " \t\r", &s2); w && t < sizeof tok / sizeof *tok; w = strtok_r(NULL, " \t\r", &s2))
      tok[t++] = w;
    if (t == 0 || tok[0][0] == '#') continue;
    if (!strcmp(tok[0], "format") && t == 2) { format_ok = !strcmp(tok[1], FORMAT); continue; }
    if (!strcmp(tok[0], "batches") && t == 2) { *batches = parse_int(tok[1], 1, INT32_MAX, "batches"); continue; }
    if (t < 5 || n == MAX_TENSORS || (strcmp(tok[0], "data") && strcmp(tok[0], "labels") && strcmp(tok[0], "state")))
      die("%s line %zu: not `role name dtype file rank dims...` (role data, labels or state). Write the folder "
          "again with export_run.py.", path, lineno);
    Entry *e = &entries[n++];
    memset(e, 0, sizeof *e);
    snprintf(e->role, sizeof e->role, "%s", tok[0]);
    snprintf(e->name, sizeof e->name, "%s", tok[1]);
    snprintf(e->dtype, sizeof e->dtype, "%s", tok[2]);
    snprintf(e->file, sizeof e->file, "%s", tok[3]);
    e->rank = (size_t)parse_int(tok[4], 0, MAX_RANK, "rank");
    if (t != 5 + e->rank) die("%s line %zu: rank %zu but %zu dimensions.", path, lineno, e->rank, t - 5);
    size_t k, count = 1;
    for (k = 0; k < sizeof DTYPES / sizeof *DTYPES && strcmp(DTYPES[k].name, e->dtype); k++) {}
    if (k == sizeof DTYPES / sizeof *DTYPES) die("%s line %zu: unknown dtype %s.", path, lineno, e->dtype);
    e->type = DTYPES[k].type;
    for (size_t d = 0; d < e->rank; d++) count *= (size_t)(e->shape[d] = parse_int(tok[5 + d], 1, INT32_MAX, "dimension"));
    e->bytes = count * DTYPES[k].size;
  }
  free(text);
  if (!format_ok) die("%s: no `format " FORMAT "` line; write the folder with export_run.py.", path);
  if (*batches < 1) die("%s: no `batches K` line.", path);
  for (size_t i = 0; i < n; i++) {
    size_t got, want = entries[i].bytes * (strcmp(entries[i].role, "state") ? (size_t)*batches : 1);
    snprintf(path, sizeof path, "%s/%s", dir, entries[i].file);
    entries[i].data = read_file(path, &got);
    if (got != want) die("%s: holds %zu bytes; the manifest's %s %s needs %zu.", path, got, entries[i].role,
                         entries[i].name, want);
  }
  return n;
}

/* The integer after `"key":` that follows the first `"object"` in the contract JSON. A scan, not a JSON
   parser: json.dumps writes the contract with sorted keys, and neither key recurs between the two. */
static long long contract_int(const char *json, const char *object, const char *key, const char *model) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\"", object);
  const char *p = strstr(json, pat);
  snprintf(pat, sizeof pat, "\"%s\"", key);
  if (p) p = strstr(p, pat);
  if (p) for (p += strlen(pat); *p == ' ' || *p == ':'; p++) {}
  char *end;
  long long v = p ? strtoll(p, &end, 10) : 0;
  if (!p || end == p) die("%s: its contract has no %s.%s; recompile it with fgcompile compile.", model, object, key);
  return v;
}

static OrtValue *tensor(const OrtMemoryInfo *mem, void *data, size_t bytes, const int64_t *shape, size_t rank,
                        ONNXTensorElementDataType type) {
  OrtValue *v = NULL;
  check(ort->CreateTensorWithDataAsOrtValue(mem, data, bytes, shape, rank, type, &v), "CreateTensor");
  return v;
}

/* Refuses an input the manifest feeds with another dtype or a fixed dimension of another size. */
static void check_input(OrtSession *sess, size_t i, const Entry *e, const char *model) {
  OrtTypeInfo *info;
  const OrtTensorTypeAndShapeInfo *t;
  ONNXTensorElementDataType type;
  size_t rank;
  int64_t dims[MAX_RANK];
  check(ort->SessionGetInputTypeInfo(sess, i, &info), "SessionGetInputTypeInfo");
  check(ort->CastTypeInfoToTensorInfo(info, &t), "CastTypeInfoToTensorInfo");
  check(ort->GetTensorElementType(t, &type), "GetTensorElementType");
  check(ort->GetDimensionsCount(t, &rank), "GetDimensionsCount");
  if (type != e->type || rank != e->rank)
    die("%s: input %s is not the manifest's %s of rank %zu; the run folder was exported from another compile. "
        "Export it again from this folder.", model, e->name, e->dtype, e->rank);
  check(ort->GetDimensions(t, dims, rank), "GetDimensions");
  for (size_t d = 0; d < rank; d++)
    if (dims[d] > 0 && dims[d] != e->shape[d])
      die("%s: input %s has dimension %zu of size %lld; the manifest says %lld. Export the run folder again "
          "from this folder.", model, e->name, d, (long long)dims[d], (long long)e->shape[d]);
  ort->ReleaseTypeInfo(info);
}

static void write_state(const char *dir, const Entry *e) {
  char path[1024], tmp[1100];
  void *data;
  OrtTensorTypeAndShapeInfo *info;
  size_t count, k;
  check(ort->GetTensorMutableData(e->value, &data), "GetTensorMutableData");
  check(ort->GetTensorTypeAndShape(e->value, &info), "GetTensorTypeAndShape");
  check(ort->GetTensorShapeElementCount(info, &count), "GetTensorShapeElementCount");
  ort->ReleaseTensorTypeAndShapeInfo(info);
  for (k = 0; DTYPES[k].type != e->type; k++) {}
  if (count * DTYPES[k].size != e->bytes) die("output %s__next: holds %zu values, not the state's shape.", e->name, count);
  snprintf(path, sizeof path, "%s/%s", dir, e->file);
  snprintf(tmp, sizeof tmp, "%s.part", path);
  FILE *f = fopen(tmp, "wb");
  if (!f || fwrite(data, 1, e->bytes, f) != e->bytes || fclose(f) != 0 || rename(tmp, path) != 0)
    die("%s: cannot write it (%s).", path, strerror(errno));
}

static const char USAGE[] =
    "usage: fgc_train [--lr N] [--seed S] [--threads T] OUT/train.onnx RUN_DIR STEPS FINAL_DIR\n"
    "  trains STEPS steps of a folder compiled by fgcompile on the batches and initial state in RUN_DIR\n"
    "  (written by export_run.py) and writes the final state to FINAL_DIR.\n"
    "  --lr N      the int32 lr input, a learning-rate numerator (default: the contract's lr_numerator.default)\n"
    "  --seed S    the run's seed in [0, 2^32), fed as int32 bits (default: the contract's spec.seed)\n"
    "  --threads T onnxruntime intra-op threads (default 0: onnxruntime's choice)\n";

int main(int argc, char **argv) {
  const char *pos[4];
  long long threads = 0, lr = 0, seed = -1;   /* 0, -1: the contract's */
  int npos = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) { fputs(USAGE, stdout); return 0; }
    int flag = !strcmp(argv[i], "--lr") || !strcmp(argv[i], "--seed") || !strcmp(argv[i], "--threads");
    if (flag && i + 1 == argc) die("%s needs a value (fgc_train --help).", argv[i]);
    if (!strcmp(argv[i], "--lr")) lr = parse_int(argv[++i], 1, INT32_MAX, "--lr");
    else if (!strcmp(argv[i], "--seed")) seed = parse_int(argv[++i], 0, 4294967295LL, "--seed");
    else if (!strcmp(argv[i], "--threads")) threads = parse_int(argv[++i], 0, 1024, "--threads");
    else if (argv[i][0] == '-' && argv[i][1] == '-') die("unknown option %s (fgc_train --help).", argv[i]);
    else if (npos == 4) die("too many arguments (%s); fgc_train --help.", argv[i]);
    else pos[npos++] = argv[i];
  }
  if (npos != 4) {
    fprintf(stderr, "fgc_train: error: expected 4 arguments, got %d.\n%s", npos, USAGE);
    return 1;
  }
  const char *model = pos[0], *run_dir = pos[1], *final_dir = pos[3];
  long long steps = parse_int(pos[2], 1, INT32_MAX, "STEPS");

  ort = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!ort) die("the onnxruntime library (%s) is older than the header (C API version %d). Build against an older "
                "onnxruntime_c_api.h or a newer library (examples/c/README.md).", OrtGetApiBase()->GetVersionString(),
                ORT_API_VERSION);

  Entry entries[MAX_TENSORS];
  long long batches;
  size_t n_entries = read_manifest(run_dir, entries, &batches);
  for (size_t i = 0; i < n_entries; i++) {
    char path[1024];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", final_dir, entries[i].file);
    if (!strcmp(entries[i].role, "state") && stat(path, &st) == 0)
      die("%s: exists; fgc_train does not overwrite files. Pass a new FINAL_DIR.", path);
  }

  OrtEnv *env;
  OrtSessionOptions *opts;
  OrtSession *sess;
  OrtAllocator *alloc;
  OrtMemoryInfo *mem;
  check(ort->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "fgc_train", &env), "CreateEnv");
  check(ort->CreateSessionOptions(&opts), "CreateSessionOptions");
  if (threads) check(ort->SetIntraOpNumThreads(opts, (int)threads), "SetIntraOpNumThreads");
  check(ort->CreateSession(env, model, opts, &sess), model);
  check(ort->GetAllocatorWithDefaultOptions(&alloc), "GetAllocatorWithDefaultOptions");
  check(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem), "CreateCpuMemoryInfo");

  OrtModelMetadata *meta;
  char *json = NULL;
  check(ort->SessionGetModelMetadata(sess, &meta), "SessionGetModelMetadata");
  check(ort->ModelMetadataLookupCustomMetadataMap(meta, alloc, "fgcompile", &json), "metadata_props");
  if (!json) die("%s: has no metadata_props[\"fgcompile\"]; it is not a train.onnx written by fgcompile compile.", model);
  if (!strstr(json, "\"" CONTRACT "\""))
    die("%s: its contract is not format " CONTRACT ", the one this driver speaks. Recompile the model with this "
        "fgcompile, or update the driver.", model);
  long long lr_max = contract_int(json, "lr_numerator", "max", model);
  if (lr > lr_max) die("--lr %lld: %s takes lr numerators up to %lld (its lr_numerator.max).", lr, model, lr_max);
  if (!lr) lr = contract_int(json, "lr_numerator", "default", model);
  if (seed < 0) seed = contract_int(json, "spec", "seed", model);
  uint32_t seed_bits = (uint32_t)seed;
  int32_t seed32, step32 = 0, lr32 = (int32_t)lr;
  memcpy(&seed32, &seed_bits, sizeof seed32);   /* int32 input: the two's-complement bits of seed */
  check(ort->AllocatorFree(alloc, json), "AllocatorFree");
  ort->ReleaseModelMetadata(meta);

  /* The inputs in the session's order: seed, step, lr (scalars read at each Run), or a manifest entry. */
  size_t n_in, n_out, n_state = 0;
  char *in_names[MAX_TENSORS], *out_names[2 + MAX_TENSORS];
  OrtValue *in[MAX_TENSORS], *out[2 + MAX_TENSORS];
  Entry *feeds[MAX_TENSORS], *state[MAX_TENSORS];
  check(ort->SessionGetInputCount(sess, &n_in), "SessionGetInputCount");
  if (n_in > MAX_TENSORS) die("%s: has %zu inputs; this driver takes at most %d.", model, n_in, MAX_TENSORS);
  for (size_t i = 0; i < n_in; i++) {
    check(ort->SessionGetInputName(sess, i, alloc, &in_names[i]), "SessionGetInputName");
    int32_t *scalar = !strcmp(in_names[i], "seed") ? &seed32 : !strcmp(in_names[i], "step") ? &step32
                    : !strcmp(in_names[i], "lr") ? &lr32 : NULL;
    feeds[i] = NULL;
    in[i] = scalar ? tensor(mem, scalar, sizeof *scalar, NULL, 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) : NULL;
    for (size_t j = 0; j < n_entries && !scalar && !feeds[i]; j++)
      if (!strcmp(entries[j].name, in_names[i])) feeds[i] = &entries[j];
    if (!scalar && !feeds[i])
      die("%s: input %s is neither seed, step nor lr, and %s/manifest.txt does not feed it. Export the run folder "
          "again from this compiled folder.", model, in_names[i], run_dir);
    if (feeds[i]) check_input(sess, i, feeds[i], model);
    if (feeds[i] && !strcmp(feeds[i]->role, "state")) {
      Entry *e = state[n_state++] = feeds[i];
      e->value = tensor(mem, e->data, e->bytes, e->shape, e->rank, e->type);
    }
  }
  /* Outputs: loss, accuracy, then NAME__next of each state input, in the order of state[]. */
  check(ort->SessionGetOutputCount(sess, &n_out), "SessionGetOutputCount");
  const char *wanted[2 + MAX_TENSORS] = {"loss", "accuracy"};
  char next_names[MAX_TENSORS][272];
  for (size_t j = 0; j < n_state; j++) {
    snprintf(next_names[j], sizeof next_names[j], "%s__next", state[j]->name);
    wanted[2 + j] = next_names[j];
  }
  for (size_t w = 0; w < 2 + n_state; w++) {
    size_t o;
    char *name = NULL;
    for (o = 0; o < n_out; o++) {
      check(ort->SessionGetOutputName(sess, o, alloc, &name), "SessionGetOutputName");
      if (!strcmp(name, wanted[w])) break;
      check(ort->AllocatorFree(alloc, name), "AllocatorFree");
    }
    if (o == n_out) die("%s: has no output %s; it is not a training graph of the " CONTRACT " contract.", model, wanted[w]);
    out_names[w] = name;
  }

  long long bad = 0;
  for (long long k = 0; k < steps; k++) {
    step32 = (int32_t)k;
    size_t b = (size_t)(k % batches);
    for (size_t i = 0; i < n_in; i++) {
      Entry *e = feeds[i];
      if (e && strcmp(e->role, "state")) in[i] = tensor(mem, e->data + b * e->bytes, e->bytes, e->shape, e->rank, e->type);
      else if (e) in[i] = e->value;
    }
    memset(out, 0, sizeof out);
    check(ort->Run(sess, NULL, (const char *const *)in_names, (const OrtValue *const *)in, n_in,
                   (const char *const *)out_names, 2 + n_state, out), "Run");
    float *loss, *accuracy;
    check(ort->GetTensorMutableData(out[0], (void **)&loss), "loss");
    check(ort->GetTensorMutableData(out[1], (void **)&accuracy), "accuracy");
    int keep = isfinite(*loss);   /* a step with a NaN/Inf loss keeps the old state */
    for (size_t j = 0; j < n_state; j++) {
      OrtValue *old = keep ? state[j]->value : out[2 + j];
      if (keep) state[j]->value = out[2 + j];
      ort->ReleaseValue(old);
    }
    if (keep) {
      printf("step %lld loss %.6f accuracy %.4f\n", k, *loss, *accuracy);
    } else {
      printf("step %lld loss %f: not finite, state kept\n", k, *loss);
      bad++;
    }
    ort->ReleaseValue(out[0]);
    ort->ReleaseValue(out[1]);
    for (size_t i = 0; i < n_in; i++)
      if (feeds[i] && strcmp(feeds[i]->role, "state")) ort->ReleaseValue(in[i]);
  }
  if (mkdir(final_dir, 0777) != 0 && errno != EEXIST) die("%s: cannot create it (%s).", final_dir, strerror(errno));
  for (size_t j = 0; j < n_state; j++) write_state(final_dir, state[j]);
  printf("%lld steps (%lld with a non-finite loss, skipped); the final state is in %s\n", steps, bad, final_dir);
  return 0;
}
