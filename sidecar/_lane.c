/* The fast lane's native core (optional: sidecar/dialects/fastlane.py falls back to Python).
 *
 * join_run(region, head, tail) reads a run of SSE events that are each exactly
 *     head + <one JSON string> + tail
 * and returns the concatenation of the decoded strings, or None where it cannot say: any byte
 * out of that shape, a control character, an unknown escape, an escaped surrogate (the
 * general path decides those), invalid UTF-8. It only ever accepts what the Python lane accepts
 * (one bytes.split on tail + head, one orjson.loads of the pieces as an array, every item a
 * string), with the same text: tests/test_fastlane.py checks both on generated and recorded
 * input, and fuzz/fuzz_meter.py compares them on arbitrary bytes.
 *
 * Memory: one output buffer no longer than the region (every escape decodes to fewer bytes
 * than it takes), on the stack for reads up to 4 KiB. No state, no Python objects kept.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define STACK_BUF 4096

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes the JSON string at p[*i] (its opening quote) into out; advances *i past its closing
 * quote. Returns the bytes written, or -1 where the general path must decide. */
static Py_ssize_t decode_string(const unsigned char *p, Py_ssize_t n, Py_ssize_t *i, char *out)
{
    Py_ssize_t k = *i, w = 0;
    if (k >= n || p[k] != '"')
        return -1;
    k++;
    for (;;) {
        if (k >= n)
            return -1;
        unsigned char c = p[k];
        if (c == '"') {
            *i = k + 1;
            return w;
        }
        if (c < 0x20)
            return -1;
        if (c != '\\') {
            Py_ssize_t j = k + 1;
            while (j < n && p[j] != '"' && p[j] != '\\' && p[j] >= 0x20)
                j++;
            memcpy(out + w, p + k, (size_t)(j - k));
            w += j - k;
            k = j;
            continue;
        }
        if (k + 1 >= n)
            return -1;
        switch (p[k + 1]) {
        case '"': out[w++] = '"'; break;
        case '\\': out[w++] = '\\'; break;
        case '/': out[w++] = '/'; break;
        case 'b': out[w++] = '\b'; break;
        case 'f': out[w++] = '\f'; break;
        case 'n': out[w++] = '\n'; break;
        case 'r': out[w++] = '\r'; break;
        case 't': out[w++] = '\t'; break;
        case 'u': {
            if (k + 6 > n)
                return -1;
            int h0 = hexval(p[k + 2]), h1 = hexval(p[k + 3]);
            int h2 = hexval(p[k + 4]), h3 = hexval(p[k + 5]);
            if ((h0 | h1 | h2 | h3) < 0)
                return -1;
            unsigned cp = (unsigned)(h0 << 12 | h1 << 8 | h2 << 4 | h3);
            if (cp >= 0xD800 && cp <= 0xDFFF)
                return -1; /* surrogates, paired or not: the general path */
            if (cp < 0x80) {
                out[w++] = (char)cp;
            } else if (cp < 0x800) {
                out[w++] = (char)(0xC0 | cp >> 6);
                out[w++] = (char)(0x80 | (cp & 0x3F));
            } else {
                out[w++] = (char)(0xE0 | cp >> 12);
                out[w++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                out[w++] = (char)(0x80 | (cp & 0x3F));
            }
            k += 6;
            continue;
        }
        default:
            return -1;
        }
        k += 2;
    }
}

static PyObject *join_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1]) ||
        !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "join_run(region: bytes, head: bytes, tail: bytes)");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    const char *head = PyBytes_AS_STRING(args[1]);
    Py_ssize_t lh = PyBytes_GET_SIZE(args[1]);
    const char *tail = PyBytes_AS_STRING(args[2]);
    Py_ssize_t lt = PyBytes_GET_SIZE(args[2]);
    if (n == 0)
        Py_RETURN_NONE;

    char stack[STACK_BUF];
    char *buf = stack;
    if (n > STACK_BUF) {
        buf = PyMem_Malloc((size_t)n);
        if (buf == NULL)
            return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    Py_ssize_t i = 0, w = 0;
    while (i < n) {
        if (n - i < lh + 2 + lt || memcmp(p + i, head, (size_t)lh) != 0)
            goto miss;
        i += lh;
        Py_ssize_t got = decode_string(p, n, &i, buf + w);
        if (got < 0)
            goto miss;
        w += got;
        if (n - i < lt || memcmp(p + i, tail, (size_t)lt) != 0)
            goto miss;
        i += lt;
    }
    result = PyUnicode_DecodeUTF8(buf, w, "strict");
    if (result != NULL)
        goto done;
    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
        goto done; /* out of memory: raise it */
    PyErr_Clear();
miss:
    result = Py_NewRef(Py_None);
done:
    if (buf != stack)
        PyMem_Free(buf);
    return result;
}

static PyMethodDef lane_methods[] = {
    {"join_run", (PyCFunction)(void (*)(void))join_run, METH_FASTCALL,
     "join_run(region, head, tail) -> str | None\n\n"
     "The decoded texts of a run of head + JSON string + tail events, concatenated; None where "
     "the general path must read the region."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lane_module = {
    PyModuleDef_HEAD_INIT, "_lane", "The fast lane's native core (see fastlane.py).", 0,
    lane_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lane(void)
{
    return PyModule_Create(&lane_module);
}
