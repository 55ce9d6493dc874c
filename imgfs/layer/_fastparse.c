/* imgfs.layer._fastparse: compiled fast paths of the two per-entry loops of a layer's metadata.
 *
 * Owns: member() -- LayerTree._parse (imgfs/layer/tree.py) for header bytes that are the
 * previous member's padding (less than 512 bytes) followed by exactly ONE plain ustar / GNU / v7
 * header block whose fields are in the plain form nearly every tar writes; entry() -- one
 * tar-split line (imgfs/layer/tarsplit.py) of the exact shapes Go writes, with canonical base64;
 * columns() -- the build loop of a layer tree (tree._Collector.add over tarsplit.decode_lines)
 * for a run of such lines: the decode, the duplicate check (names whose key is the name or the
 * name less a trailing "/"), the running counts and bounds the caller hands it, the member
 * columns; newlines() -- bytes.count(b"\n") with memchr.
 * Must not know: PAX records, GNU long names, base-256 numbers, JSON beyond those shapes, the
 * bounds' values (the caller passes them), error messages.
 *
 * The Python code (tree.parse_member, tarsplit.decode_lines, tree._Collector.add) is the
 * reference and the only code that raises errors. This module returns None for anything it does not handle exactly as that
 * code would (extension headers, a field that is not plain octal, a name that needs an error or
 * is not already the tar-split's name, sizes that differ, unknown types, escapes in a line,
 * base64 that is not canonical, ...), and the Python code then decides. It never raises for
 * bad input, only for a caller's programming error (wrong argument types, an unbound type).
 *
 * Safety: the input is untrusted store bytes. Every read is inside the 512-byte block, which is
 * checked to lie inside the bytes object first; no field is assumed to be NUL-terminated
 * (memchr bounded by the field's length); octal fields have at most 12 digits (< 2**36, checked
 * at compile time to fit 64 bits) and mtime * 10**9 is only computed below INT64_MAX; the GIL is
 * held throughout (a call of member() or entry() is a few hundred nanoseconds; one of columns()
 * at most one chunk of lines or 4096 members, about a millisecond). columns() checks every
 * bound before it changes anything (a declined line leaves all as it was), compares counts
 * with bounds by subtracting two non-negative int64s (checked at entry), and appends only to
 * bytearrays it resized first.
 *
 * Results are built without calling the frozen dataclasses' __init__: the instance is made by
 * object.__new__ and each slot is set through its member descriptor, which is what the
 * generated __init__ does with object.__setattr__ (bind() checks the class has exactly the
 * expected slots, no __new__ and no __post_init__).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The SHA-256 of this file, from setup.py: compiled.py declines a build of another source. */
#ifndef SOURCE_SHA256
#define SOURCE_SHA256 "unknown"
#endif

#define BLOCK 512
#define OCTAL_DIGITS_MAX 12
_Static_assert(3 * OCTAL_DIGITS_MAX < 64, "a 12-digit octal field fits 64 bits");
#define NS_PER_S 1000000000LL
#define MAX_NAME_BYTES (155 + 1 + 100) /* ustar prefix "/" name */

/* Member's fields, in its declaration order (tree.Member). */
static const char *const MEMBER_FIELDS[] = {
    "path", "typeflag", "mode", "uid", "gid", "size", "mtime_ns", "linkname",
    "devmajor", "devminor", "xattrs", "crc", "data_name", "ref", "implied",
};
enum {
    F_PATH, F_TYPEFLAG, F_MODE, F_UID, F_GID, F_SIZE, F_MTIME, F_LINKNAME,
    F_DEVMAJOR, F_DEVMINOR, F_XATTRS, F_CRC, F_DATA_NAME, F_REF, F_IMPLIED, N_MEMBER_FIELDS
};
static const char *const SEGMENT_FIELDS[] = {"payload"};          /* tarsplit.Segment */
static const char *const FILE_ENTRY_FIELDS[] = {"name", "size", "crc"}; /* tarsplit.FileEntry */
#define MAX_FIELDS N_MEMBER_FIELDS

/* A frozen slots dataclass this module builds: its field names, and once bound, the class
 * and its slots' member descriptors (strong references). */
struct shape {
    const char *const *names;
    int n;
    PyTypeObject *type;
    PyObject *descr[MAX_FIELDS];
};
static struct shape MEMBER = {MEMBER_FIELDS, N_MEMBER_FIELDS, NULL, {NULL}};
static struct shape SEGMENT = {SEGMENT_FIELDS, 1, NULL, {NULL}};
static struct shape FILE_ENTRY = {FILE_ENTRY_FIELDS, 3, NULL, {NULL}};
static struct shape *const SHAPES[] = {&MEMBER, &SEGMENT, &FILE_ENTRY};
_Static_assert(sizeof(MEMBER_FIELDS) / sizeof(MEMBER_FIELDS[0]) == N_MEMBER_FIELDS, "names");

static PyObject *empty_tuple;
static int add_generation(PyObject *module); /* the generation section, at the end */

/* One plain octal field as tarheader._plain_numbers reads it: only "01234567", " " and NUL,
 * spaces and NULs trimmed at both ends, nothing but digits between them, empty = 0.
 * Returns 0 and sets *out, or -1 when the field is not plain (Python's _number decides). */
static int
plain_octal(const unsigned char *field, size_t len, uint64_t *out)
{
    size_t lo = 0, hi = len;
    uint64_t value = 0;

    if (len > OCTAL_DIGITS_MAX)
        return -1;
    while (lo < hi && (field[lo] == ' ' || field[lo] == 0))
        lo++;
    while (hi > lo && (field[hi - 1] == ' ' || field[hi - 1] == 0))
        hi--;
    for (size_t i = lo; i < hi; i++) {
        unsigned char c = field[i];
        if (c < '0' || c > '7')
            return -1;
        value = value << 3 | (uint64_t)(c - '0');
    }
    *out = value;
    return 0;
}

/* Length of the NUL-terminated prefix of a field of len bytes (the whole field without one). */
static size_t
cstr_len(const unsigned char *field, size_t len)
{
    const unsigned char *nul = memchr(field, 0, len);
    return nul == NULL ? len : (size_t)(nul - field);
}

/* tarsplit.clean_name into out (room for len bytes): components split on "/", empty and "."
 * ones dropped, joined with "/"; "." when none is left. Returns the length, or -1 for a NUL or
 * a ".." component (clean_name raises UnsafePath: Python decides). */
static Py_ssize_t
clean_name(const unsigned char *name, size_t len, unsigned char *out)
{
    size_t n = 0, i = 0;

    if (memchr(name, 0, len) != NULL)
        return -1;
    while (i < len) {
        size_t start = i, part;
        while (i < len && name[i] != '/')
            i++;
        part = i - start;
        i++; /* past the "/" (or the end) */
        if (part == 0 || (part == 1 && name[start] == '.'))
            continue;
        if (part == 2 && name[start] == '.' && name[start + 1] == '.')
            return -1;
        if (n > 0)
            out[n++] = '/';
        memcpy(out + n, name + start, part);
        n += part;
    }
    if (n == 0)
        out[n++] = '.'; /* room: len >= 1 here (the caller handles the empty name) */
    return (Py_ssize_t)n;
}

/* bytes of a cleaned name: `same` (a bytes object holding name) when the cleaned name equals
 * it, else a new object. NULL with no exception set: Python decides; NULL with one: error. */
static PyObject *
cleaned(const unsigned char *name, size_t len, PyObject *same)
{
    unsigned char buf[MAX_NAME_BYTES + 1];
    Py_ssize_t n;

    if (len == 0) /* clean_name(b"") == b"." */
        return PyBytes_FromStringAndSize(".", 1);
    if (len > MAX_NAME_BYTES)
        return NULL;
    n = clean_name(name, len, buf);
    if (n < 0)
        return NULL;
    if (same != NULL && (size_t)n == len && memcmp(buf, name, len) == 0) {
        Py_INCREF(same);
        return same;
    }
    return PyBytes_FromStringAndSize((const char *)buf, n);
}

/* Set slot `field` of obj (an instance of shape's class) to value (a new reference, consumed;
 * NULL: an allocation failed). */
static int
set_field(struct shape *shape, PyObject *obj, int field, PyObject *value)
{
    PyObject *descr = shape->descr[field];
    int rc;

    if (value == NULL)
        return -1;
    rc = Py_TYPE(descr)->tp_descr_set(descr, obj, value);
    Py_DECREF(value);
    return rc;
}

/* A new, empty instance of shape's class. */
static PyObject *
new_instance(struct shape *shape)
{
    return PyBaseObject_Type.tp_new(shape->type, empty_tuple, NULL);
}

/* The fields of one member, C values first. */
struct parsed {
    char typeflag;
    uint64_t mode, uid, gid, size, mtime, devmajor, devminor;
    const unsigned char *linkname;
    size_t linkname_len;
};

/* Parse the block; 0 when it is plain and names `name` (the tar-split's), else -1. */
static int
parse_block(const unsigned char *block, const char *name, size_t name_len, struct parsed *p)
{
    static const unsigned char USTAR_MAGIC[8] = {'u', 's', 't', 'a', 'r', 0, '0', '0'};
    static const unsigned char GNU_MAGIC[8] = {'u', 's', 't', 'a', 'r', ' ', ' ', 0};
    unsigned char header_name[MAX_NAME_BYTES];
    size_t header_len, base_len;
    unsigned char flag = block[156];
    int ustar = memcmp(block + 257, USTAR_MAGIC, 8) == 0;
    int gnu = memcmp(block + 257, GNU_MAGIC, 8) == 0;

    if (flag == 'x' || flag == 'L' || flag == 'K')
        return -1; /* an extension header: parse_header's loop */

    /* name, joined to the ustar prefix (star's is 131 bytes) */
    base_len = cstr_len(block, 100);
    header_len = 0;
    if (ustar) {
        int star = memcmp(block + 508, "tar\0", 4) == 0;
        size_t prefix_len = cstr_len(block + 345, star ? 131 : 155);
        if (prefix_len > 0) {
            memcpy(header_name, block + 345, prefix_len);
            header_name[prefix_len] = '/';
            header_len = prefix_len + 1;
        }
    }
    memcpy(header_name + header_len, block, base_len);
    header_len += base_len;
    if (header_len != name_len || memcmp(header_name, name, name_len) != 0)
        return -1; /* _parse: "the tar header names ..." */

    if (flag == '0' || flag == 0 || flag == '7')
        flag = (flag == 0 && header_len > 0 && header_name[header_len - 1] == '/') ? '5' : '0';
    if (strchr("0123456g", flag) == NULL || flag == 0)
        return -1; /* not in KNOWN_TYPES: _parse's error */
    p->typeflag = (char)flag;

    if (plain_octal(block + 100, 8, &p->mode) || plain_octal(block + 108, 8, &p->uid)
        || plain_octal(block + 116, 8, &p->gid) || plain_octal(block + 124, 12, &p->size)
        || plain_octal(block + 136, 12, &p->mtime))
        return -1; /* _number decides each field */
    p->devmajor = p->devminor = 0;
    if ((ustar || gnu)
        && (plain_octal(block + 329, 8, &p->devmajor) || plain_octal(block + 337, 8, &p->devminor)))
        return -1;
    if (p->mtime > (uint64_t)(INT64_MAX / NS_PER_S))
        return -1; /* mtime_ns would not fit 64 bits: Python's ints */
    p->linkname = block + 157;
    p->linkname_len = cstr_len(block + 157, 100);
    return 0;
}

PyDoc_STRVAR(member_doc,
"member(data, name, size, crc, ref, /) -> Member | None\n\n"
"LayerTree._parse's Member for header bytes `data` (padding, then one plain header block)\n"
"naming `name` with tar-split size `size`; None when the Python code must decide.");

static PyObject *
member(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *data, *name, *size_obj, *crc, *ref, *obj;
    unsigned long long size;
    Py_ssize_t data_len;
    struct parsed p;
    const unsigned char *block;

    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "member() takes 5 arguments");
        return NULL;
    }
    data = args[0], name = args[1], size_obj = args[2], crc = args[3], ref = args[4];
    if (!PyBytes_Check(data) || !PyBytes_Check(name) || !PyLong_Check(size_obj)) {
        PyErr_SetString(PyExc_TypeError, "member() wants bytes, bytes, int, ...");
        return NULL;
    }
    if (MEMBER.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "member(): bind() the Member type first");
        return NULL;
    }
    size = PyLong_AsUnsignedLongLong(size_obj);
    if (size == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear(); /* negative, or 2**64 and more: no header holds it; Python's error */
        Py_RETURN_NONE;
    }

    data_len = PyBytes_GET_SIZE(data);
    if (data_len < BLOCK || data_len >= 2 * BLOCK)
        Py_RETURN_NONE; /* no block, or more than one: parse_header */
    block = (const unsigned char *)PyBytes_AS_STRING(data) + data_len % BLOCK;
    if (parse_block(block, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name), &p))
        Py_RETURN_NONE;
    if (p.typeflag != '0' ? size != 0 : p.size != size)
        Py_RETURN_NONE; /* _parse: unsupported type with content, or sizes differ */

    PyObject *path = cleaned((const unsigned char *)PyBytes_AS_STRING(name),
                             (size_t)PyBytes_GET_SIZE(name), name);
    if (path == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    if (PyBytes_GET_SIZE(path) == 1 && PyBytes_AS_STRING(path)[0] == '.') {
        Py_SETREF(path, PyBytes_FromStringAndSize("", 0)); /* the layer root */
        if (path == NULL)
            return NULL;
    }
    PyObject *link;
    if (p.typeflag == '1') {
        link = cleaned(p.linkname, p.linkname_len, NULL);
        if (link == NULL) {
            Py_DECREF(path);
            return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        }
    } else {
        link = PyBytes_FromStringAndSize((const char *)p.linkname, (Py_ssize_t)p.linkname_len);
        if (link == NULL) {
            Py_DECREF(path);
            return NULL;
        }
    }

    obj = new_instance(&MEMBER);
    if (obj != NULL
        && (set_field(&MEMBER, obj, F_PATH, Py_NewRef(path)) < 0
            || set_field(&MEMBER, obj, F_TYPEFLAG, PyUnicode_FromStringAndSize(&p.typeflag, 1)) < 0
            || set_field(&MEMBER, obj, F_MODE, PyLong_FromUnsignedLongLong(p.mode & 07777)) < 0
            || set_field(&MEMBER, obj, F_UID, PyLong_FromUnsignedLongLong(p.uid)) < 0
            || set_field(&MEMBER, obj, F_GID, PyLong_FromUnsignedLongLong(p.gid)) < 0
            || set_field(&MEMBER, obj, F_SIZE, Py_NewRef(size_obj)) < 0
            || set_field(&MEMBER, obj, F_MTIME, PyLong_FromLongLong((long long)p.mtime * NS_PER_S)) < 0
            || set_field(&MEMBER, obj, F_LINKNAME, Py_NewRef(link)) < 0
            || set_field(&MEMBER, obj, F_DEVMAJOR, PyLong_FromUnsignedLongLong(p.devmajor)) < 0
            || set_field(&MEMBER, obj, F_DEVMINOR, PyLong_FromUnsignedLongLong(p.devminor)) < 0
            || set_field(&MEMBER, obj, F_XATTRS, Py_NewRef(empty_tuple)) < 0
            || set_field(&MEMBER, obj, F_CRC, Py_NewRef(crc)) < 0
            || set_field(&MEMBER, obj, F_DATA_NAME, Py_NewRef(name)) < 0
            || set_field(&MEMBER, obj, F_REF, Py_NewRef(ref)) < 0
            || set_field(&MEMBER, obj, F_IMPLIED, Py_NewRef(Py_False)) < 0))
        Py_CLEAR(obj);
    Py_DECREF(path);
    Py_DECREF(link);
    return obj;
}

/* -- tar-split lines ---------------------------------------------------------------------- */

#define SEGMENT_HEAD "{\"type\":2,\"payload\":\""
#define FILE_HEAD "{\"type\":1,\"name\":\""
#define CRC_LEN 8

static int
starts(const unsigned char *p, size_t len, const char *text)
{
    size_t n = strlen(text);
    return len >= n && memcmp(p, text, n) == 0;
}

/* The value of each base64 character; 0x80 for every other byte. */
static unsigned char B64[256];

static void
init_b64(void)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    memset(B64, 0x80, sizeof(B64));
    for (unsigned i = 0; i < 64; i++)
        B64[(unsigned char)alphabet[i]] = (unsigned char)i;
}

/* The decoded length of base64 text of len bytes in the canonical shape (a multiple of 4,
 * "=" only as the last one or two characters), else -1. */
static Py_ssize_t
b64_length(const unsigned char *text, size_t len)
{
    size_t pad = 0;

    if (len % 4 != 0)
        return -1;
    if (len > 0 && text[len - 1] == '=')
        pad = text[len - 2] == '=' ? 2 : 1; /* len >= 4 here */
    return (Py_ssize_t)(len / 4 * 3 - pad);
}

/* Canonical base64 (b64_length >= 0, unused bits zero) decoded into dst (room for
 * b64_length bytes): 0, or -1 when the text is not canonical (dst then holds garbage). */
static int
b64_into(const unsigned char *text, size_t len, unsigned char *dst)
{
    size_t pad = 0, full, o = 0;
    unsigned bad = 0;

    if (len > 0 && text[len - 1] == '=')
        pad = text[len - 2] == '=' ? 2 : 1;
    full = pad ? len - 4 : len; /* the quanta without padding */
    for (size_t i = 0; i < full; i += 4) {
        unsigned a = B64[text[i]], b = B64[text[i + 1]], c = B64[text[i + 2]], d = B64[text[i + 3]];
        bad |= a | b | c | d;
        uint32_t q = a << 18 | b << 12 | c << 6 | d;
        dst[o++] = (unsigned char)(q >> 16);
        dst[o++] = (unsigned char)(q >> 8);
        dst[o++] = (unsigned char)q;
    }
    if (pad) {
        const unsigned char *t = text + full;
        unsigned a = B64[t[0]], b = B64[t[1]], c = pad == 2 ? 0 : B64[t[2]];
        bad |= a | b | c;
        uint32_t q = a << 18 | b << 12 | c << 6;
        if (pad == 2 ? (q & 0xFFFF) != 0 : (q & 0xFF) != 0)
            bad |= 0x80; /* unused bits set: not canonical */
        dst[o++] = (unsigned char)(q >> 16);
        if (pad == 1)
            dst[o++] = (unsigned char)(q >> 8);
    }
    return (bad & 0x80) ? -1 : 0;
}

/* Canonical base64 decoded into a new bytes object; NULL without an exception when the text
 * is not canonical (the Python code decides), NULL with one when memory ran out. */
static PyObject *
b64_decode(const unsigned char *text, size_t len)
{
    Py_ssize_t out_len = b64_length(text, len);
    PyObject *out;

    if (out_len < 0)
        return NULL;
    out = PyBytes_FromStringAndSize(NULL, out_len);
    if (out == NULL)
        return NULL;
    if (b64_into(text, len, (unsigned char *)PyBytes_AS_STRING(out)) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* `"position":[0-9]{1,19}}` from p to exactly the end: 1, else 0. */
static int
position_tail(const unsigned char *p, size_t len)
{
    static const char key[] = "\"position\":";
    size_t n = sizeof(key) - 1, digits = 0;

    if (len < n + 2 || memcmp(p, key, n) != 0 || p[len - 1] != '}')
        return 0;
    for (size_t i = n; i < len - 1; i++) {
        if (p[i] < '0' || p[i] > '9')
            return 0;
        digits++;
    }
    return digits >= 1 && digits <= 19;
}

/* {"type":2,"payload":"<base64>","position":N}: 0 and the payload text's span, else -1. */
static int
segment_span(const unsigned char *line, size_t len, size_t *start, size_t *end)
{
    size_t head = strlen(SEGMENT_HEAD);
    const unsigned char *quote = memchr(line + head, '"', len - head);

    if (quote == NULL)
        return -1;
    *start = head;
    *end = (size_t)(quote - line);
    /* after the payload: `","position":N}` */
    if (len - *end < 2 || quote[1] != ',' || !position_tail(quote + 2, len - *end - 2))
        return -1;
    return 0;
}

/* {"type":2,"payload":"<base64>","position":N} -> Segment */
static PyObject *
segment_line(const unsigned char *line, size_t len)
{
    size_t start, end;
    PyObject *payload, *obj;

    if (segment_span(line, len, &start, &end) < 0)
        return NULL;
    payload = b64_decode(line + start, end - start);
    if (payload == NULL)
        return NULL;
    obj = new_instance(&SEGMENT);
    if (obj != NULL && set_field(&SEGMENT, obj, 0, Py_NewRef(payload)) < 0)
        Py_CLEAR(obj);
    Py_DECREF(payload);
    return obj;
}

/* The fields of one file line, C values. */
struct file_fields {
    size_t name_start, name_end;
    long long size;     /* 0 without a size */
    int has_crc;        /* a size, and so its 8-byte CRC */
    unsigned char crc[CRC_LEN];
};

/* {"type":1,"name":"<name>",["size":N,]"payload":("<base64>"|null),"position":N}: 0 and its
 * fields (the name without escapes, NUL or control characters; size 1-15 digits; a size needs
 * an 8-byte CRC payload; without a size the payload is ignored, as the Python code does), else
 * -1 (the Python code decides). */
static int
file_fields(const unsigned char *line, size_t len, struct file_fields *f)
{
    size_t i = strlen(FILE_HEAD), crc_start = 0, crc_end = 0;
    int has_size = 0, has_payload = 0;

    f->name_start = i;
    f->size = 0;
    f->has_crc = 0;
    while (i < len && line[i] != '"' && line[i] != '\\' && line[i] >= 0x20)
        i++;
    f->name_end = i;
    if (f->name_end == f->name_start || !starts(line + i, len - i, "\","))
        return -1;
    i += 2;
    if (starts(line + i, len - i, "\"size\":")) {
        size_t digits = 0;
        i += strlen("\"size\":");
        if (i >= len || line[i] < '1' || line[i] > '9')
            return -1;
        while (i < len && line[i] >= '0' && line[i] <= '9') {
            if (++digits > 16)
                return -1;
            f->size = f->size * 10 + (line[i] - '0'); /* at most 16 digits: < 2**63 */
            i++;
        }
        if (digits >= 16 || i >= len || line[i] != ',')
            return -1; /* 16 digits: the Python code's general path */
        i++;
        has_size = 1;
    }
    if (!starts(line + i, len - i, "\"payload\":"))
        return -1;
    i += strlen("\"payload\":");
    if (starts(line + i, len - i, "null")) {
        i += 4;
    } else if (i < len && line[i] == '"') {
        crc_start = ++i;
        while (i < len && line[i] != '"' && line[i] != '\\')
            i++;
        if (i >= len || line[i] != '"')
            return -1;
        crc_end = i++;
        has_payload = 1;
    } else {
        return -1;
    }
    if (i >= len || line[i] != ',' || !position_tail(line + i + 1, len - i - 1))
        return -1;
    if (!has_size) {
        f->size = 0;
        return 0;
    }
    if (!has_payload || b64_length(line + crc_start, crc_end - crc_start) != CRC_LEN
        || b64_into(line + crc_start, crc_end - crc_start, f->crc) < 0)
        return -1; /* a size without an 8-byte CRC: the general path (an error) */
    f->has_crc = 1;
    return 0;
}

/* The file line as a FileEntry. */
static PyObject *
file_line(const unsigned char *line, size_t len)
{
    struct file_fields f;
    PyObject *name = NULL, *size_obj = NULL, *crc = NULL, *obj = NULL;

    if (file_fields(line, len, &f) < 0)
        return NULL;
    crc = f.has_crc ? PyBytes_FromStringAndSize((const char *)f.crc, CRC_LEN) : Py_NewRef(Py_None);
    name = PyBytes_FromStringAndSize((const char *)line + f.name_start,
                                     (Py_ssize_t)(f.name_end - f.name_start));
    size_obj = PyLong_FromLongLong(f.size);
    if (name != NULL && size_obj != NULL && crc != NULL) {
        obj = new_instance(&FILE_ENTRY);
        if (obj != NULL
            && (set_field(&FILE_ENTRY, obj, 0, Py_NewRef(name)) < 0
                || set_field(&FILE_ENTRY, obj, 1, Py_NewRef(size_obj)) < 0
                || set_field(&FILE_ENTRY, obj, 2, Py_NewRef(crc)) < 0))
            Py_CLEAR(obj);
    }
    Py_XDECREF(name);
    Py_XDECREF(size_obj);
    Py_XDECREF(crc);
    return obj;
}

PyDoc_STRVAR(entry_doc,
"entry(line, /) -> Segment | FileEntry | None\n\n"
"The entry of one tar-split line (no newline) of the shapes Go writes, or None when the\n"
"Python code must decide. The caller has checked the line is valid UTF-8.");

static PyObject *
entry(PyObject *module, PyObject *line_obj)
{
    const unsigned char *line;
    size_t len;
    PyObject *found;

    (void)module;
    if (!PyBytes_Check(line_obj)) {
        PyErr_SetString(PyExc_TypeError, "entry() wants bytes");
        return NULL;
    }
    if (SEGMENT.type == NULL || FILE_ENTRY.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "entry(): bind() Segment and FileEntry first");
        return NULL;
    }
    line = (const unsigned char *)PyBytes_AS_STRING(line_obj);
    len = (size_t)PyBytes_GET_SIZE(line_obj);
    if (starts(line, len, SEGMENT_HEAD))
        found = segment_line(line, len);
    else if (starts(line, len, FILE_HEAD))
        found = file_line(line, len);
    else
        Py_RETURN_NONE;
    if (found == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return found;
}

/* -- a layer tree's columns from tar-split lines ---------------------------------------------
 *
 * columns() is tree._Collector.add over tarsplit._decode_chunk for a run of lines: what the two
 * do per line (the decode, the duplicate check, the counts and bounds, a member's columns),
 * without building an entry. It stops BEFORE the first line it does not take exactly as they
 * would -- any line entry() declines, a blank line that is not empty, a name whose duplicate
 * key is not the name itself (or the name less its one trailing "/"), a duplicate, a bound that
 * would be crossed, a member with no whole header block before it -- and leaves everything as
 * it was before that line: the Python code then decodes it (and raises, if it must).
 */

enum {
    C_TOTAL,       /* tar bytes described so far (rw) */
    C_LIMIT,       /* the bound of C_TOTAL (r) */
    C_PENDING,     /* header bytes since the last member (rw; pending holds them) */
    C_MAX_PENDING, /* the bound of C_PENDING (r) */
    C_SEGMENTS,    /* segment bytes so far (rw) */
    C_MAX_SEGMENTS,/* the bound of C_SEGMENTS (r) */
    C_MEMBERS,     /* members so far (rw): columns() returns after each 4096th */
    C_HEAD_BASE,   /* the header stream's length before this call's headers (r) */
    C_NAME_BASE,   /* the name bytes before this call's names (r) */
    N_COUNTS
};
enum { O_TYPES, O_SIZES, O_CRCS, O_HEAD_POS, O_HEAD_LEN, O_NAME_POS, O_NAMES, O_HEADERS, N_OUT };
#define BUDGET_EVERY 4096
#define TYPEFLAG_AT (BLOCK - 156) /* from the block's end */

/* Append n bytes to bytearray ba: 0, or -1 with MemoryError. */
static int
append(PyObject *ba, const void *p, size_t n)
{
    Py_ssize_t old = PyByteArray_GET_SIZE(ba);

    if (n > (size_t)(PY_SSIZE_T_MAX - old)) {
        PyErr_NoMemory();
        return -1;
    }
    if (PyByteArray_Resize(ba, old + (Py_ssize_t)n) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(ba) + old, p, n);
    return 0;
}

/* The duplicate key (go_clean) of a fast-shape name when it is the name or the name less one
 * trailing "/": its length, else -1. */
static Py_ssize_t
plain_key(const unsigned char *name, size_t len)
{
    if (name[0] == '.')
        return -1;
    for (size_t i = 0; i + 1 < len; i++)
        if (name[i] == '/' && (name[i + 1] == '/' || name[i + 1] == '.'))
            return -1;
    if (name[len - 1] != '/')
        return (Py_ssize_t)len;
    return len >= 2 ? (Py_ssize_t)len - 1 : -1; /* "/" stays "/" */
}

/* One segment line: 1 taken, 0 declined, -1 error. */
static int
take_segment(const unsigned char *line, size_t len, int64_t *counts, PyObject *pending)
{
    size_t start, end;
    Py_ssize_t n, old = PyByteArray_GET_SIZE(pending);

    if (segment_span(line, len, &start, &end) < 0)
        return 0;
    n = b64_length(line + start, end - start);
    if (n < 0 || n > counts[C_MAX_SEGMENTS] - counts[C_SEGMENTS]
        || n > counts[C_LIMIT] - counts[C_TOTAL] || n > counts[C_MAX_PENDING] - counts[C_PENDING]
        || old != counts[C_PENDING])
        return 0;
    if (PyByteArray_Resize(pending, old + n) < 0)
        return -1;
    if (b64_into(line + start, end - start, (unsigned char *)PyByteArray_AS_STRING(pending) + old)
        < 0) {
        return PyByteArray_Resize(pending, old) < 0 ? -1 : 0;
    }
    counts[C_SEGMENTS] += n;
    counts[C_TOTAL] += n;
    counts[C_PENDING] += n;
    return 1;
}

/* One file line: 2 taken (a member), 0 declined, -1 error. */
static int
take_file(const unsigned char *line, size_t len, int64_t *counts, PyObject *seen,
          PyObject *pending, PyObject *const *out)
{
    struct file_fields f;
    const unsigned char *name;
    size_t name_len, plen, skip;
    Py_ssize_t key_len;
    PyObject *key;
    int found;
    unsigned char flag;
    uint64_t size, crc = 0, head_pos, name_pos;
    uint32_t head_len;

    if (file_fields(line, len, &f) < 0)
        return 0;
    name = line + f.name_start;
    name_len = f.name_end - f.name_start;
    key_len = plain_key(name, name_len);
    plen = (size_t)PyByteArray_GET_SIZE(pending);
    skip = plen % BLOCK;
    if (key_len < 0 || f.size > counts[C_LIMIT] - counts[C_TOTAL]
        || (int64_t)plen != counts[C_PENDING] || plen - skip < BLOCK)
        return 0;
    key = PyBytes_FromStringAndSize((const char *)name, key_len);
    if (key == NULL)
        return -1;
    found = PySet_Contains(seen, key);
    if (found != 0 || PySet_Add(seen, key) < 0) {
        Py_DECREF(key);
        return found > 0 ? 0 : -1;
    }
    Py_DECREF(key);

    flag = (unsigned char)PyByteArray_AS_STRING(pending)[plen - TYPEFLAG_AT];
    if (flag == 0 || flag == '0' || flag == '7') /* Go: '\0' names ending in "/" are dirs */
        flag = flag == 0 && name[name_len - 1] == '/' ? '5' : '0';
    size = (uint64_t)f.size;
    for (int i = 0; f.has_crc && i < CRC_LEN; i++)
        crc = crc << 8 | f.crc[i];
    head_pos = (uint64_t)counts[C_HEAD_BASE] + (uint64_t)PyByteArray_GET_SIZE(out[O_HEADERS]);
    head_len = (uint32_t)(plen - skip); /* <= C_MAX_PENDING, checked by the caller to fit */
    if (append(out[O_TYPES], &flag, 1) < 0 || append(out[O_SIZES], &size, 8) < 0
        || append(out[O_CRCS], &crc, 8) < 0 || append(out[O_HEAD_POS], &head_pos, 8) < 0
        || append(out[O_HEAD_LEN], &head_len, 4) < 0 || append(out[O_NAMES], name, name_len) < 0
        || append(out[O_HEADERS], PyByteArray_AS_STRING(pending) + skip, plen - skip) < 0)
        return -1;
    name_pos = (uint64_t)counts[C_NAME_BASE] + (uint64_t)PyByteArray_GET_SIZE(out[O_NAMES]);
    if (append(out[O_NAME_POS], &name_pos, 8) < 0 || PyByteArray_Resize(pending, 0) < 0)
        return -1;
    counts[C_TOTAL] += f.size;
    counts[C_PENDING] = 0;
    counts[C_MEMBERS] += 1;
    return 2;
}

PyDoc_STRVAR(columns_doc,
"columns(chunk, pos, counts, seen, pending, out, /) -> (pos, declined)\n\n"
"tree._Collector.add of tarsplit._decode_chunk's entries for the lines of `chunk` (whole\n"
"lines, valid UTF-8, none longer than MAX_LINE) from offset `pos`: `counts` is the int64\n"
"array of C_* values, `seen` the duplicate keys, `pending` the header bytes since the last\n"
"member, `out` 8 bytearrays the columns are appended to (native uint64 sizes, CRCs, header\n"
"positions, name end positions; uint32 header lengths; type bytes, names, headers). Returns\n"
"where it stopped and whether at a line it declined (else after a 4096th member, or past the\n"
"end: len(chunk) + 1).");

static PyObject *
columns(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *chunk, *seen, *pending, *out_tuple;
    PyObject *out[N_OUT];
    Py_buffer view;
    Py_ssize_t pos;
    const unsigned char *data;
    size_t len;
    int64_t *counts;
    int declined = 0, rc = 1;

    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "columns() takes 6 arguments");
        return NULL;
    }
    chunk = args[0], seen = args[3], pending = args[4], out_tuple = args[5];
    pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(chunk) || !PySet_Check(seen) || !PyByteArray_Check(pending)
        || !PyTuple_Check(out_tuple) || PyTuple_GET_SIZE(out_tuple) != N_OUT || pos < 0
        || pos > PyBytes_GET_SIZE(chunk) + 1) {
        PyErr_SetString(PyExc_TypeError, "columns() wants bytes, a position in it, counts, a set, "
                                         "a bytearray and 8 bytearrays");
        return NULL;
    }
    for (int i = 0; i < N_OUT; i++) {
        out[i] = PyTuple_GET_ITEM(out_tuple, i);
        if (!PyByteArray_Check(out[i]) || out[i] == pending) {
            PyErr_SetString(PyExc_TypeError, "columns(): out holds 8 other bytearrays");
            return NULL;
        }
    }
    if (PyObject_GetBuffer(args[2], &view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (view.itemsize != 8 || view.len != N_COUNTS * 8 || view.format == NULL
        || (strcmp(view.format, "q") != 0 && strcmp(view.format, "l") != 0)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "columns(): counts is an int64 array of N_COUNTS items");
        return NULL;
    }
    counts = (int64_t *)view.buf;
    for (int i = 0; i < N_COUNTS; i++)
        rc &= counts[i] >= 0;
    /* (C_PENDING may exceed its bound: the Python code then dropped the bytes, and every
     * later header is declined) */
    if (!rc || counts[C_TOTAL] > counts[C_LIMIT] || counts[C_SEGMENTS] > counts[C_MAX_SEGMENTS]
        || counts[C_MAX_PENDING] > (int64_t)UINT32_MAX) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "columns(): counts out of range (or the header bound "
                                          "does not fit 32 bits)");
        return NULL;
    }
    data = (const unsigned char *)PyBytes_AS_STRING(chunk);
    len = (size_t)PyBytes_GET_SIZE(chunk);
    while ((size_t)pos <= len) {
        const unsigned char *line = data + pos;
        const unsigned char *nl = memchr(line, '\n', len - (size_t)pos);
        size_t line_len = nl == NULL ? len - (size_t)pos : (size_t)(nl - line);

        if (line_len == 0)
            rc = 1; /* a blank line: skipped (the caller counted it) */
        else if (starts(line, line_len, SEGMENT_HEAD))
            rc = take_segment(line, line_len, counts, pending);
        else if (starts(line, line_len, FILE_HEAD))
            rc = take_file(line, line_len, counts, seen, pending, out);
        else
            rc = 0;
        if (rc <= 0) {
            declined = rc == 0;
            break;
        }
        pos += (Py_ssize_t)line_len + 1;
        if (rc == 2 && counts[C_MEMBERS] % BUDGET_EVERY == 0)
            break; /* the caller checks the memory budget */
    }
    PyBuffer_Release(&view);
    if (rc < 0)
        return NULL;
    return Py_BuildValue("(nO)", pos, declined ? Py_True : Py_False);
}

PyDoc_STRVAR(newlines_doc,
"newlines(data, /) -> int\n\n"
"data.count(b\"\\n\") for bytes `data` (memchr).");

static PyObject *
newlines(PyObject *module, PyObject *data)
{
    const char *p, *end;
    Py_ssize_t count = 0;

    (void)module;
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "newlines() wants bytes");
        return NULL;
    }
    p = PyBytes_AS_STRING(data);
    end = p + PyBytes_GET_SIZE(data);
    while (p < end && (p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        count++;
        p++;
    }
    return PyLong_FromSsize_t(count);
}

PyDoc_STRVAR(bind_doc,
"bind(cls, /) -> None\n\n"
"Build instances of `cls`, a slots dataclass with exactly the fields of tree.Member,\n"
"tarsplit.Segment or tarsplit.FileEntry (whichever its __slots__ name).");

/* The shape whose field names are exactly the tuple `slots`, else NULL. */
static struct shape *
shape_of(PyObject *slots)
{
    if (!PyTuple_Check(slots))
        return NULL;
    for (size_t k = 0; k < sizeof(SHAPES) / sizeof(SHAPES[0]); k++) {
        struct shape *shape = SHAPES[k];
        int ok = PyTuple_GET_SIZE(slots) == shape->n;
        for (int i = 0; ok && i < shape->n; i++) {
            PyObject *slot = PyTuple_GET_ITEM(slots, i);
            ok = PyUnicode_Check(slot)
                 && PyUnicode_CompareWithASCIIString(slot, shape->names[i]) == 0;
        }
        if (ok)
            return shape;
    }
    return NULL;
}

static PyObject *
bind(PyObject *module, PyObject *cls)
{
    PyObject *found[MAX_FIELDS] = {NULL};
    PyObject *slots;
    struct shape *shape;

    (void)module;
    if (!PyType_Check(cls) || ((PyTypeObject *)cls)->tp_new != PyBaseObject_Type.tp_new
        || PyObject_HasAttrString(cls, "__post_init__")) {
        PyErr_SetString(PyExc_TypeError, "bind() wants a class without __new__ or __post_init__");
        return NULL;
    }
    slots = PyObject_GetAttrString(cls, "__slots__");
    if (slots == NULL)
        PyErr_Clear();
    shape = slots == NULL ? NULL : shape_of(slots);
    Py_XDECREF(slots);
    if (shape == NULL) {
        PyErr_SetString(PyExc_TypeError, "bind(): the class's __slots__ are no known fields");
        return NULL;
    }
    for (int i = 0; i < shape->n; i++) {
        PyObject *descr = PyDict_GetItemString(((PyTypeObject *)cls)->tp_dict, shape->names[i]);
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)
            || PyDescr_TYPE(descr) != (PyTypeObject *)cls) {
            for (int j = 0; j < i; j++)
                Py_DECREF(found[j]);
            PyErr_Format(PyExc_TypeError, "bind(): %s is not a slot of the class", shape->names[i]);
            return NULL;
        }
        found[i] = Py_NewRef(descr);
    }
    for (int i = 0; i < shape->n; i++)
        Py_XSETREF(shape->descr[i], found[i]);
    Py_INCREF(cls);
    Py_XSETREF(shape->type, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"member", (PyCFunction)(void (*)(void))member, METH_FASTCALL, member_doc},
    {"entry", entry, METH_O, entry_doc},
    {"columns", (PyCFunction)(void (*)(void))columns, METH_FASTCALL, columns_doc},
    {"newlines", newlines, METH_O, newlines_doc},
    {"bind", bind, METH_O, bind_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "imgfs.layer._fastparse",
    "Compiled fast paths of LayerTree._parse and the tar-split line decoder.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastparse(void)
{
    init_b64();
    PyObject *module;

    empty_tuple = PyTuple_New(0);
    if (empty_tuple == NULL)
        return NULL;
    module = PyModule_Create(&module_def);
    if (module != NULL && PyModule_AddStringConstant(module, "SOURCE_SHA256", SOURCE_SHA256) < 0)
        Py_CLEAR(module);
    if (module != NULL && add_generation(module) < 0)
        Py_CLEAR(module);
    return module;
}


/* ============================================================================================
 * Generation of a layer blob: batched opens (imgfs/store/layerfiles.py LayerFiles.open_many)
 * and the copy loop (imgfs/layer/assemble.py _Generator.run).
 *
 * Owns: open_files() -- LayerFiles._open_beneath + _check for a batch of names in ONE layer
 * directory (fstatat probe without following, openat2 with the caller's flags and resolve
 * rules, O_NOATIME dropped on EPERM as files.noatime does, fstat: regular and of the recorded
 * size, POSIX_FADV_WILLNEED of the first bytes); copy_entries() -- the tar bytes of a run of
 * (entry, fd) pairs into the staging buffer: segments verbatim, each file's content by pread
 * from offset 0, its end checked (one more pread returns nothing) and its CRC-64/GO-ISO
 * (the polynomial and conventions of Go's hash/crc64 ISO table, as fastcrc's go_iso) compared
 * with the tar-split's; entries() -- tarsplit._decode_chunk's loop for the lines entry()
 * decodes (duplicate names and the segment bound checked as there); crc64_go_iso() for tests.
 * Must not know: error messages, lower directories, publish marks, the pipeline.
 *
 * As above, the Python code is the reference and the only code that raises for bad input:
 * open_files() gives None for a name it does not open cleanly (any errno, a symlink, not a
 * regular file, another size), and LayerFiles.open opens it at its turn with its own errors;
 * copy_entries() stops BEFORE the first pair it does not complete cleanly (no fd, a file that
 * does not fit the room left, a short or long file, a CRC mismatch, a read error) and the
 * Python code copies that pair itself from offset 0 (pread leaves the fd's offset alone) and
 * raises. Bytes written past the returned fill are scratch. Both release the GIL for their
 * syscalls: the arguments are first copied into C arrays under the GIL, holding references to
 * the names (a copy of the list), the payloads and the staging buffer (a Py_buffer export: a
 * bytearray cannot be resized). copy_entries closes the fds it copied only once its result is
 * built: when it raises, every fd is still the caller's.
 * ============================================================================================ */
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Integer arguments, each converted and checked at once (no C-API call with an error set). */
static int
ssize_arg(PyObject *obj, Py_ssize_t *out)
{
    *out = PyLong_AsSsize_t(obj);
    return !(*out == -1 && PyErr_Occurred());
}

static int
ll_arg(PyObject *obj, long long *out)
{
    *out = PyLong_AsLongLong(obj);
    return !(*out == -1 && PyErr_Occurred());
}

static int
ull_arg(PyObject *obj, unsigned long long *out)
{
    *out = PyLong_AsUnsignedLongLong(obj);
    return !(*out == (unsigned long long)-1 && PyErr_Occurred());
}

#ifndef SYS_openat2
#define SYS_openat2 437
#endif
struct imgfs_open_how {
    uint64_t flags, mode, resolve;
};
#define OPEN_RETRIES 8 /* files.openat2: EINTR and EAGAIN (a concurrent rename) are retried */
#define GEN_MAX_BATCH 4096

static uint64_t crc_table[8][256];

static void
init_crc(void)
{
    const uint64_t poly = 0xD800000000000000ULL; /* ISO 3309, reflected (Go's crc64.ISO) */
    for (int i = 0; i < 256; i++) {
        uint64_t crc = (uint64_t)i;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ poly : crc >> 1;
        crc_table[0][i] = crc;
    }
    for (int i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++)
            crc_table[k][i] = crc_table[0][crc_table[k - 1][i] & 0xff] ^ (crc_table[k - 1][i] >> 8);
}

/* Go's crc64.Update(crc, MakeTable(ISO), p): slicing by 8. */
static uint64_t
crc64_update(uint64_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
#endif
        crc ^= v;
        crc = crc_table[7][crc & 0xff] ^ crc_table[6][(crc >> 8) & 0xff]
              ^ crc_table[5][(crc >> 16) & 0xff] ^ crc_table[4][(crc >> 24) & 0xff]
              ^ crc_table[3][(crc >> 32) & 0xff] ^ crc_table[2][(crc >> 40) & 0xff]
              ^ crc_table[1][(crc >> 48) & 0xff] ^ crc_table[0][crc >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

PyDoc_STRVAR(crc64_doc, "crc64_go_iso(data, crc=0) -> int: Go's crc64.Update(crc, ISO, data).");

static PyObject *
crc64_go_iso(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned long long crc = 0;
    uint64_t out;

    (void)self;
    if (!PyArg_ParseTuple(args, "y*|K", &view, &crc))
        return NULL;
    out = crc64_update((uint64_t)crc, (const unsigned char *)view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(out);
}

static long
openat2_retry(int dirfd, const char *name, uint64_t flags, uint64_t resolve)
{
    struct imgfs_open_how how = {flags, 0, resolve};
    long fd = -1;
    for (int i = 0; i < OPEN_RETRIES; i++) {
        fd = syscall(SYS_openat2, dirfd, name, &how, sizeof how);
        if (fd >= 0 || (errno != EINTR && errno != EAGAIN))
            break;
    }
    return fd;
}

/* One name: its fd; -1 (Python opens it at its turn and says why); or -errno when the process
 * or the system is out of descriptors (EMFILE, ENFILE: the caller stops opening ahead). */
static int
open_one(int dirfd, const char *name, uint64_t size, uint64_t flags, uint64_t resolve,
         uint64_t advise)
{
    struct stat st;
    long fd;

    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)
        || (uint64_t)st.st_size != size)
        return -1;
    fd = openat2_retry(dirfd, name, flags, resolve);
    if (fd < 0 && errno == EPERM && (flags & O_NOATIME)) /* files.noatime */
        fd = openat2_retry(dirfd, name, flags & ~(uint64_t)O_NOATIME, resolve);
    if (fd < 0)
        return errno == EMFILE || errno == ENFILE ? -errno : -1;
    if (fstat((int)fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != size) {
        close((int)fd);
        return -1;
    }
    if (advise && size)
        (void)posix_fadvise((int)fd, 0, (off_t)(size < advise ? size : advise),
                            POSIX_FADV_WILLNEED);
    return (int)fd;
}

/* The name tarsplit.clean_name gives for a member name that is already clean (a "./" prefix
 * dropped, no "." or ".." component, no "//", no NUL, no "/" at either end), else NULL (the
 * Python code cleans it, or refuses it). Points into the bytes object (NUL-terminated). */
static const char *
already_clean(PyObject *name)
{
    const char *body = PyBytes_AS_STRING(name);
    size_t len = (size_t)PyBytes_GET_SIZE(name);

    if (len >= 2 && body[0] == '.' && body[1] == '/') {
        body += 2;
        len -= 2;
    }
    if (len == 0 || body[0] == '.' || body[0] == '/' || body[len - 1] == '/'
        || strlen(body) != len)
        return NULL;
    for (size_t i = 0; i + 1 < len; i++)
        if (body[i] == '/' && (body[i + 1] == '/' || body[i + 1] == '.'))
            return NULL;
    return body;
}

PyDoc_STRVAR(open_files_doc,
"open_files(dirfd, names, sizes, flags, resolve, advise) -> list[int | None]\n\n"
"For each member name (bytes, as the tar-split has it) that is already clean, below dirfd: a\n"
"read-only fd of the regular file of exactly that size, opened with openat2(flags, resolve)\n"
"(without O_NOATIME where that is refused), its first `advise` bytes asked of the disk; else\n"
"None, or -errno (EMFILE, ENFILE) for the name that ran out of descriptors (and None after it).");

static PyObject *
open_files(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dirfd;
    unsigned long long flags, resolve, advise;
    PyObject *names, *sizes, *out = NULL;
    Py_ssize_t n;
    const char **cnames = NULL;
    uint64_t *csizes = NULL;
    int *fds = NULL;

    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "open_files() takes 6 arguments");
        return NULL;
    }
    {
        long d = PyLong_AsLong(args[0]);
        if (d == -1 && PyErr_Occurred())
            return NULL;
        if (d < 0 || d > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "open_files(): dirfd out of range");
            return NULL;
        }
        dirfd = (int)d;
    }
    if (!ull_arg(args[3], &flags) || !ull_arg(args[4], &resolve) || !ull_arg(args[5], &advise))
        return NULL;
    names = args[1];
    sizes = args[2];
    if (!PyList_CheckExact(names) || !PyList_CheckExact(sizes)
        || PyList_GET_SIZE(names) != PyList_GET_SIZE(sizes)) {
        PyErr_SetString(PyExc_TypeError, "open_files(): names and sizes: lists of one length");
        return NULL;
    }
    n = PyList_GET_SIZE(names);
    if (n > GEN_MAX_BATCH) {
        PyErr_SetString(PyExc_ValueError, "open_files(): too many names");
        return NULL;
    }
    cnames = PyMem_Calloc((size_t)n + 1, sizeof *cnames);
    csizes = PyMem_Calloc((size_t)n + 1, sizeof *csizes);
    fds = PyMem_Calloc((size_t)n + 1, sizeof *fds);
    if (cnames == NULL || csizes == NULL || fds == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyList_GET_ITEM(names, i), *size = PyList_GET_ITEM(sizes, i);
        long long sz;
        if (!PyBytes_CheckExact(name) || !PyLong_CheckExact(size)) {
            PyErr_SetString(PyExc_TypeError, "open_files(): names are bytes, sizes ints");
            goto done;
        }
        sz = PyLong_AsLongLong(size);
        if (sz == -1 && PyErr_Occurred())
            PyErr_Clear(); /* out of range: no file has that size */
        cnames[i] = sz < 0 ? NULL : already_clean(name);
        csizes[i] = (uint64_t)(sz < 0 ? 0 : sz);
    }
    /* A copy of the list holds every name while the GIL is released: another thread may
     * change the caller's list meanwhile (cnames point into the bytes objects). */
    names = PyList_GetSlice(names, 0, n);
    if (names == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        fds[i] = cnames[i] == NULL ? -1
                 : open_one(dirfd, cnames[i], csizes[i], flags, resolve, advise);
        if (fds[i] < -1) { /* out of descriptors: nothing more is tried */
            for (Py_ssize_t j = i + 1; j < n; j++)
                fds[j] = -1;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(names);
    out = PyList_New(n);
    if (out == NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (fds[i] >= 0)
                close(fds[i]);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = fds[i] == -1 ? Py_NewRef(Py_None) : PyLong_FromLong(fds[i]);
        if (item == NULL) { /* close this one and every later fd; the list owns the earlier */
            for (Py_ssize_t j = i; j < n; j++)
                if (fds[j] >= 0)
                    close(fds[j]);
            for (Py_ssize_t j = 0; j < i; j++)
                if (fds[j] >= 0)
                    close(fds[j]);
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, item);
    }
done:
    PyMem_Free(cnames);
    PyMem_Free(csizes);
    PyMem_Free(fds);
    return out;
}

/* One pair of copy_entries, in C: a segment's bytes or a file's fd, size and CRC. */
struct gen_item {
    PyObject *payload; /* a segment's bytes (a strong reference), else NULL */
    int fd;            /* a file's fd, -1 for an empty file */
    uint64_t size;     /* bytes the pair adds to the blob */
    uint64_t crc;
};

static PyObject *str_payload, *str_size, *str_crc;

/* Read one pair's Python fields; 1: done (item filled), 0: the Python code copies it, -1: error. */
static int
gen_item_of(PyObject *pair, struct gen_item *item)
{
    PyObject *entry, *opened, *value;

    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
        PyErr_SetString(PyExc_TypeError, "copy_entries(): items are (entry, opened) pairs");
        return -1;
    }
    entry = PyTuple_GET_ITEM(pair, 0);
    opened = PyTuple_GET_ITEM(pair, 1);
    item->payload = NULL;
    item->fd = -1;
    item->crc = 0;
    if (SEGMENT.type != NULL && Py_IS_TYPE(entry, SEGMENT.type)) {
        value = PyObject_GetAttr(entry, str_payload);
        if (value == NULL)
            return -1;
        if (!PyBytes_CheckExact(value)) {
            Py_DECREF(value);
            return 0;
        }
        item->payload = value;
        item->size = (uint64_t)PyBytes_GET_SIZE(value);
        return 1;
    }
    if (FILE_ENTRY.type == NULL || !Py_IS_TYPE(entry, FILE_ENTRY.type))
        return 0;
    value = PyObject_GetAttr(entry, str_size);
    if (value == NULL)
        return -1;
    if (!PyLong_CheckExact(value)) {
        Py_DECREF(value);
        return 0;
    }
    {
        long long sz = PyLong_AsLongLong(value);
        Py_DECREF(value);
        if (sz == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        if (sz < 0)
            return 0;
        item->size = (uint64_t)sz;
    }
    if (item->size == 0)
        return 1; /* no content (the generator skips it too) */
    if (!PyLong_CheckExact(opened))
        return 0; /* opened at its turn, or the error of opening it: the Python code */
    {
        long fd = PyLong_AsLong(opened);
        if (fd == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        if (fd < 0 || fd > INT32_MAX)
            return 0;
        item->fd = (int)fd;
    }
    value = PyObject_GetAttr(entry, str_crc);
    if (value == NULL)
        return -1;
    if (!PyBytes_CheckExact(value) || PyBytes_GET_SIZE(value) != 8) {
        Py_DECREF(value);
        return 0;
    }
    for (int k = 0; k < 8; k++)
        item->crc = (item->crc << 8) | (unsigned char)PyBytes_AS_STRING(value)[k];
    Py_DECREF(value);
    return 1;
}

/* Copy one file's content into dst (room >= size): 0 when it is exactly size bytes long and
 * its CRC matches, else -1 (errno is not looked at: the Python code redoes it and says why). */
static int
copy_file(int fd, unsigned char *dst, uint64_t size, uint64_t crc)
{
    uint64_t got = 0;
    unsigned char extra;

    while (got < size) {
        ssize_t n = pread(fd, dst + got, (size_t)(size - got), (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        got += (uint64_t)n;
    }
    for (;;) {
        ssize_t n = pread(fd, &extra, 1, (off_t)size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != 0)
            return -1;
        break;
    }
    return crc64_update(0, dst, (size_t)size) == crc ? 0 : -1;
}

PyDoc_STRVAR(copy_entries_doc,
"copy_entries(buf, fill, items, start, limit, stop_fill) -> (next, fill, slow)\n\n"
"Copy items[start:] -- (Segment | FileEntry, fd | None | Exception) pairs -- into the writable\n"
"buf from offset fill, each only if it completes cleanly, adds at most limit bytes in all and\n"
"fits the buffer; a copied file's fd is closed (none when it raises: the caller closes them\n"
"all). Stops after the pair that brings fill to stop_fill or more (slow False), or before the\n"
"first pair the Python code must copy (slow True), or at the end of items (slow False).");

static PyObject *
copy_entries(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t fill, start, n, count = 0, done = 0;
    long long limit_ll, stop_ll;
    uint64_t limit, stop_fill, pos, used = 0;
    PyObject *items, *result = NULL;
    struct gen_item *work = NULL;
    int slow = 0, stop_early = 0;

    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "copy_entries() takes 6 arguments");
        return NULL;
    }
    if (!ssize_arg(args[1], &fill) || !ssize_arg(args[3], &start)
        || !ll_arg(args[4], &limit_ll) || !ll_arg(args[5], &stop_ll))
        return NULL;
    items = args[2];
    if (!PyList_CheckExact(items)) {
        PyErr_SetString(PyExc_TypeError, "copy_entries(): items must be a list");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    n = PyList_GET_SIZE(items);
    if (fill < 0 || fill > view.len || start < 0 || start > n || limit_ll < 0 || stop_ll < 0) {
        PyErr_SetString(PyExc_ValueError, "copy_entries(): fill, start, limit or stop_fill");
        goto done;
    }
    limit = (uint64_t)limit_ll;
    stop_fill = (uint64_t)stop_ll;
    if (n - start > GEN_MAX_BATCH)
        n = start + GEN_MAX_BATCH;
    work = PyMem_Calloc((size_t)(n - start) + 1, sizeof *work);
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Under the GIL: the pairs' fields, up to the first one the Python code must copy. */
    for (Py_ssize_t i = start; i < n; i++) {
        int rc = gen_item_of(PyList_GET_ITEM(items, i), &work[count]);
        if (rc < 0)
            goto done;
        if (rc == 0) {
            slow = 1;
            break;
        }
        count++;
    }
    pos = (uint64_t)fill;
    Py_BEGIN_ALLOW_THREADS
    for (done = 0; done < count; done++) {
        struct gen_item *it = &work[done];
        unsigned char *dst = (unsigned char *)view.buf + pos;
        if (it->size > limit - used || it->size > (uint64_t)view.len - pos)
            break;
        if (it->payload != NULL)
            memcpy(dst, PyBytes_AS_STRING(it->payload), (size_t)it->size);
        else if (it->size != 0) {
            if (copy_file(it->fd, dst, it->size, it->crc) != 0)
                break;
        }
        pos += it->size;
        used += it->size;
        if (pos >= stop_fill) {
            done++;
            stop_early = 1;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (done < count && !stop_early)
        slow = 1; /* stopped before work[done]: the Python code copies it */
    else if (stop_early)
        slow = 0;
    result = Py_BuildValue("(nnO)", start + done, (Py_ssize_t)pos, slow ? Py_True : Py_False);
    /* The copied files' fds are closed only once the result is built: an exception means none
     * was, as the caller then closes every fd from start (a second close could hit another
     * thread's new fd). */
    if (result != NULL) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < done; i++)
            if (work[i].payload == NULL && work[i].size != 0)
                close(work[i].fd);
        Py_END_ALLOW_THREADS
    }
done:
    if (work != NULL)
        for (Py_ssize_t i = 0; i < count; i++)
            Py_XDECREF(work[i].payload);
    PyMem_Free(work);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *str_name;

/* Whether tarsplit.go_clean(name) is name for a name file_line() gave (the duplicate key). */
static int
go_clean_is_same(PyObject *name)
{
    const char *b = PyBytes_AS_STRING(name);
    Py_ssize_t n = PyBytes_GET_SIZE(name);

    if (n == 0 || b[0] == '.' || b[n - 1] == '/')
        return 0;
    for (Py_ssize_t i = 0; i + 1 < n; i++)
        if (b[i] == '/' && (b[i + 1] == '/' || b[i + 1] == '.'))
            return 0;
    return 1;
}

PyDoc_STRVAR(entries_doc,
"entries(chunk, pos, seen, segment_room, max_lines) -> (entries, pos, lines, segment_bytes)\n\n"
"tarsplit._decode_chunk's loop over the lines of chunk (valid UTF-8) from byte offset pos, for\n"
"the lines entry() decodes (and blank ones): each file's name (when go_clean keeps it) checked\n"
"against and added to the set seen, the segments' bytes kept within segment_room. Stops before\n"
"the first other line or after max_lines lines (pos: the next line's offset; lines: how many\n"
"were consumed), or past the end (pos > len(chunk)); the Python code decides the line at pos\n"
"(max_lines bounds how long one call holds the GIL).");

static PyObject *
entries(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *buf;
    Py_ssize_t len, pos, lines = 0, max_lines;
    long long room, seg_bytes = 0;
    PyObject *chunk, *seen, *out, *result;

    (void)module;
    if (nargs != 5 || !PyBytes_CheckExact(args[0]) || !PySet_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "entries(chunk: bytes, pos, seen: set, room, max_lines)");
        return NULL;
    }
    if (SEGMENT.type == NULL || FILE_ENTRY.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "entries(): bind() Segment and FileEntry first");
        return NULL;
    }
    chunk = args[0];
    seen = args[2];
    if (!ssize_arg(args[1], &pos) || !ll_arg(args[3], &room) || !ssize_arg(args[4], &max_lines))
        return NULL;
    buf = (const unsigned char *)PyBytes_AS_STRING(chunk);
    len = PyBytes_GET_SIZE(chunk);
    if (pos < 0 || pos > len + 1) {
        PyErr_SetString(PyExc_ValueError, "entries(): pos out of range");
        return NULL;
    }
    out = PyList_New(0);
    if (out == NULL)
        return NULL;
    while (pos <= len && lines < max_lines) {
        const unsigned char *line = buf + pos, *nl = memchr(line, '\n', (size_t)(len - pos));
        size_t llen = nl != NULL ? (size_t)(nl - line) : (size_t)(len - pos);
        Py_ssize_t next = nl != NULL ? (Py_ssize_t)(nl - buf) + 1 : len + 1;
        PyObject *obj;

        if (llen == 0) { /* a blank line: skipped (as line.strip() is empty) */
            pos = next;
            lines++;
            continue;
        }
        if (starts(line, llen, SEGMENT_HEAD))
            obj = segment_line(line, llen);
        else if (starts(line, llen, FILE_HEAD))
            obj = file_line(line, llen);
        else
            break;
        if (obj == NULL) {
            if (PyErr_Occurred())
                goto fail;
            break;
        }
        if (Py_IS_TYPE(obj, SEGMENT.type)) {
            PyObject *payload = PyObject_GetAttr(obj, str_payload);
            long long plen;
            if (payload == NULL) {
                Py_DECREF(obj);
                goto fail;
            }
            plen = (long long)PyBytes_GET_SIZE(payload);
            Py_DECREF(payload);
            if (plen > room - seg_bytes) { /* the Python code raises at this line */
                Py_DECREF(obj);
                break;
            }
            seg_bytes += plen;
        } else {
            PyObject *name = PyObject_GetAttr(obj, str_name);
            int dup;
            if (name == NULL) {
                Py_DECREF(obj);
                goto fail;
            }
            if (!go_clean_is_same(name)) { /* its key is go_clean's: the Python code */
                Py_DECREF(name);
                Py_DECREF(obj);
                break;
            }
            dup = PySet_Contains(seen, name);
            if (dup == 0)
                dup = PySet_Add(seen, name) < 0 ? -1 : 0;
            else if (dup == 1) { /* a duplicate: the Python code raises at this line */
                Py_DECREF(name);
                Py_DECREF(obj);
                break;
            }
            Py_DECREF(name);
            if (dup < 0) {
                Py_DECREF(obj);
                goto fail;
            }
        }
        if (PyList_Append(out, obj) < 0) {
            Py_DECREF(obj);
            goto fail;
        }
        Py_DECREF(obj);
        pos = next;
        lines++;
    }
    result = Py_BuildValue("(NnnL)", out, pos, lines, seg_bytes);
    return result;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef generation_methods[] = {
    {"open_files", (PyCFunction)(void (*)(void))open_files, METH_FASTCALL, open_files_doc},
    {"copy_entries", (PyCFunction)(void (*)(void))copy_entries, METH_FASTCALL, copy_entries_doc},
    {"crc64_go_iso", crc64_go_iso, METH_VARARGS, crc64_doc},
    {"entries", (PyCFunction)(void (*)(void))entries, METH_FASTCALL, entries_doc},
    {NULL, NULL, 0, NULL},
};

static int
add_generation(PyObject *module)
{
    init_crc();
    str_payload = PyUnicode_InternFromString("payload");
    str_size = PyUnicode_InternFromString("size");
    str_crc = PyUnicode_InternFromString("crc");
    str_name = PyUnicode_InternFromString("name");
    if (str_payload == NULL || str_size == NULL || str_crc == NULL || str_name == NULL)
        return -1;
    return PyModule_AddFunctions(module, generation_methods);
}
