/* The fast lane's native core (optional: sidecar/dialects/fastlane.py falls back to Python).
 *
 * scan_run(data, head, tail, keys, pad) reads the run of SSE events at the start of ``data``
 * that are each exactly head + <one JSON string> + tail once their volatile parts are left out
 * (``,"key":value`` pairs of ``keys``, Anthropic's padding where ``pad``: what the Python lane's
 * pattern removes), and returns (bytes taken, the decoded strings concatenated). It stops
 * before the first event it cannot take: another shape, a partial event, a control character,
 * an unknown escape, an escaped surrogate (the Python lane decides those), a string that is
 * not valid UTF-8 on its own. Whatever it takes, the Python lane takes with the same text:
 * tests/test_fastlane.py checks both on generated and recorded input, and fuzz/fuzz_meter.py
 * compares them on arbitrary bytes.
 *
 * Memory: one output buffer no longer than the data (every escape decodes to fewer bytes than
 * it takes), on the stack for reads up to 4 KiB. No state, no Python objects kept.
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

/* Whether out[0:w] is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing
 * above U+10FFFF), what orjson and Python's strict decoder accept. Each string is checked on
 * its own: two events' invalid halves must not make one valid character when joined. */
static int valid_utf8(const unsigned char *s, Py_ssize_t w)
{
    Py_ssize_t i = 0;
    while (i < w) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        Py_ssize_t need;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0)
                lo = 0xA0;
            else if (c == 0xED)
                hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0)
                lo = 0x90;
            else if (c == 0xF4)
                hi = 0x8F;
        } else {
            return 0;
        }
        if (w - i <= need || s[i + 1] < lo || s[i + 1] > hi)
            return 0;
        for (Py_ssize_t k = 2; k <= need; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF)
                return 0;
        i += need + 1;
    }
    return 1;
}

/* Decodes the JSON string at p[*i] (its opening quote) into out; advances *i past its closing
 * quote. Returns the bytes written, or -1 where the general path must decide. *raw_high is
 * set when a byte of 0x80 or more was copied as is (escapes always give whole characters:
 * without such a byte the string is valid UTF-8). */
static Py_ssize_t decode_string(const unsigned char *p, Py_ssize_t n, Py_ssize_t *i, char *out,
                                int *raw_high)
{
    Py_ssize_t k = *i, w = 0;
    unsigned char high = 0;
    if (k >= n || p[k] != '"')
        return -1;
    k++;
    for (;;) {
        if (k >= n)
            return -1;
        unsigned char c = p[k];
        if (c == '"') {
            *i = k + 1;
            *raw_high = high >= 0x80;
            return w;
        }
        if (c < 0x20)
            return -1;
        if (c != '\\') {
            Py_ssize_t j = k + 1;
            high |= c;
            while (j < n && p[j] != '"' && p[j] != '\\' && p[j] >= 0x20)
                high |= p[j++];
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

/* The value of a volatile pair (what fastlane.volatile's pattern takes): a plain ASCII string
 * ("[\x20\x21\x23-\x5b\x5d-\x7e]*") or an integer ("-?(?:0|[1-9][0-9]*)"). Returns the index after
 * it, or -1. */
static Py_ssize_t skip_value(const unsigned char *p, Py_ssize_t n, Py_ssize_t k)
{
    if (k < n && p[k] == '"') {
        for (k++; k < n; k++) {
            unsigned char c = p[k];
            if (c == '"')
                return k + 1;
            if (c < 0x20 || c > 0x7e || c == '\\')
                return -1;
        }
        return -1;
    }
    if (k < n && p[k] == '-')
        k++;
    if (k >= n || p[k] < '0' || p[k] > '9')
        return -1;
    if (p[k] == '0')
        return k + 1;
    while (k < n && p[k] >= '0' && p[k] <= '9')
        k++;
    return k;
}

/* Where what starts at p[k] is volatile (a ,"key":value pair of one of ``keys``, or Anthropic's
 * padding: spaces after a brace and before "}\n\n"), the index after it; else k. The same
 * leftmost matches as the Python lane's pattern.sub, which removes them before comparing. */
static Py_ssize_t skip_volatile(const unsigned char *p, Py_ssize_t n, Py_ssize_t k,
                                PyObject *keys, int pad)
{
    if (p[k] == ',') {
        Py_ssize_t nk = PyTuple_GET_SIZE(keys);
        for (Py_ssize_t x = 0; x < nk; x++) {
            PyObject *key = PyTuple_GET_ITEM(keys, x);
            Py_ssize_t lk = PyBytes_GET_SIZE(key);
            if (n - k >= lk && memcmp(p + k, PyBytes_AS_STRING(key), (size_t)lk) == 0) {
                Py_ssize_t after = skip_value(p, n, k + lk);
                if (after > 0)
                    return after;
            }
        }
    } else if (pad && p[k] == ' ' && k > 0 && p[k - 1] == '}') {
        Py_ssize_t j = k;
        while (j < n && p[j] == ' ')
            j++;
        if (n - j >= 3 && p[j] == '}' && p[j + 1] == '\n' && p[j + 2] == '\n')
            return j;
    }
    return k;
}

/* Whether the event bytes at p[*k] are ``t`` once volatile parts are left out; advances *k. */
static int match(const unsigned char *p, Py_ssize_t n, Py_ssize_t *k, const char *t,
                 Py_ssize_t lt, PyObject *keys, int pad)
{
    Py_ssize_t i = 0, j = *k;
    int skips = PyTuple_GET_SIZE(keys) > 0 || pad;
    if (n - j >= lt && memcmp(p + j, t, (size_t)lt) == 0) {
        /* The common case: nothing volatile within (a template holds no volatile part, and
         * none can begin inside it: it ends in a text key's colon or a blank line). */
        j += lt;
        while (skips && j < n) {
            Py_ssize_t after = skip_volatile(p, n, j, keys, pad);
            if (after == j)
                break;
            j = after;
        }
        *k = j;
        return 1;
    }
    for (;;) {
        if (skips && j < n) {
            Py_ssize_t after = skip_volatile(p, n, j, keys, pad);
            if (after != j) {
                j = after;
                continue;
            }
        }
        if (i == lt)
            break;
        if (j >= n || p[j] != (unsigned char)t[i])
            return 0;
        i++;
        j++;
    }
    *k = j;
    return 1;
}

/* scan_run(data, head, tail, keys, pad) -> (end, text) */
static PyObject *scan_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 5 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1]) ||
        !PyBytes_Check(args[2]) || !PyTuple_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "scan_run(data: bytes, head: bytes, tail: bytes, "
                                         "keys: tuple[bytes, ...], pad: bool)");
        return NULL;
    }
    PyObject *keys = args[3];
    for (Py_ssize_t x = 0; x < PyTuple_GET_SIZE(keys); x++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(keys, x)) ||
            PyBytes_GET_SIZE(PyTuple_GET_ITEM(keys, x)) == 0) {
            PyErr_SetString(PyExc_TypeError, "scan_run: keys must be non-empty bytes");
            return NULL;
        }
    }
    int pad = PyObject_IsTrue(args[4]);
    if (pad < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    const char *head = PyBytes_AS_STRING(args[1]);
    Py_ssize_t lh = PyBytes_GET_SIZE(args[1]);
    const char *tail = PyBytes_AS_STRING(args[2]);
    Py_ssize_t lt = PyBytes_GET_SIZE(args[2]);

    char stack[STACK_BUF];
    char *buf = stack;
    if (n > STACK_BUF) {
        buf = PyMem_Malloc((size_t)n);
        if (buf == NULL)
            return PyErr_NoMemory();
    }
    /* Whole events only: head, one string, tail; stop before the first that is not one. */
    Py_ssize_t end = 0, w = 0;
    while (end < n) {
        Py_ssize_t k = end;
        if (!match(p, n, &k, head, lh, keys, pad))
            break;
        int raw_high;
        Py_ssize_t got = decode_string(p, n, &k, buf + w, &raw_high);
        if (got < 0 || (raw_high && !valid_utf8((const unsigned char *)buf + w, got)))
            break;
        if (!match(p, n, &k, tail, lt, keys, pad))
            break;
        w += got;
        end = k;
    }
    PyObject *text = NULL, *result = NULL;
    if (end > 0) {
        /* valid: every string was checked (a failure here can only be out of memory) */
        text = PyUnicode_DecodeUTF8(buf, w, "strict");
        if (text == NULL)
            goto done;
    }
    if (text == NULL)
        text = PyUnicode_New(0, 0);
    if (text != NULL) {
        PyObject *taken = PyLong_FromSsize_t(end);
        if (taken != NULL)
            result = PyTuple_Pack(2, taken, text);
        Py_XDECREF(taken);
        Py_DECREF(text);
    }
done:
    if (buf != stack)
        PyMem_Free(buf);
    return result;
}

static PyMethodDef lane_methods[] = {
    {"scan_run", (PyCFunction)(void (*)(void))scan_run, METH_FASTCALL,
     "scan_run(data, head, tail, keys, pad) -> (end, text)\n\n"
     "The longest run of whole head + JSON string + tail events at the start of data (volatile "
     "pairs of keys, and padding where pad, left out) and its texts concatenated; (0, '') "
     "where the Python lane must read it."},
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
