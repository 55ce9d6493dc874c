/* imgfs.layer._fastparse: the compiled fast path of LayerTree._parse (imgfs/layer/tree.py).
 *
 * Owns: turning the header bytes of one tar member -- the previous member's padding (less than
 * 512 bytes) followed by exactly ONE plain ustar / GNU / v7 header block -- into the tree's
 * Member, when every field is in the plain form nearly every tar writes. Must not know: PAX
 * records, GNU long names, base-256 numbers, error messages, anything else.
 *
 * The Python code (tarheader.parse_header + LayerTree._parse) is the reference and the only code
 * that raises errors. This module returns None for anything it does not handle exactly as that
 * code would (extension headers, a field that is not plain octal, a name that needs an error or
 * is not already the tar-split's name, sizes that differ, unknown types, ...), and the Python
 * code then decides. It never raises for bad input, only for a caller's programming error
 * (wrong argument types, an unbound Member type).
 *
 * Safety: the input is untrusted store bytes. Every read is inside the 512-byte block, which is
 * checked to lie inside the bytes object first; no field is assumed to be NUL-terminated
 * (memchr bounded by the field's length); octal fields have at most 12 digits (< 2**36, checked
 * at compile time to fit 64 bits) and mtime * 10**9 is only computed below INT64_MAX; the GIL is
 * held throughout (a call is a few hundred nanoseconds).
 *
 * Members are built without calling Member.__init__: the instance is made by object.__new__
 * and each slot is set through its member descriptor, which is what the frozen dataclass's
 * generated __init__ does with object.__setattr__ (bind() checks the type is such a class).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512
#define OCTAL_DIGITS_MAX 12
_Static_assert(3 * OCTAL_DIGITS_MAX < 64, "a 12-digit octal field fits 64 bits");
#define NS_PER_S 1000000000LL
#define MAX_NAME_BYTES (155 + 1 + 100) /* ustar prefix "/" name */

/* Member's fields, in its declaration order (tree.Member). */
static const char *const FIELD_NAMES[] = {
    "path", "typeflag", "mode", "uid", "gid", "size", "mtime_ns", "linkname",
    "devmajor", "devminor", "xattrs", "crc", "data_name", "ref", "implied",
};
enum {
    F_PATH, F_TYPEFLAG, F_MODE, F_UID, F_GID, F_SIZE, F_MTIME, F_LINKNAME,
    F_DEVMAJOR, F_DEVMINOR, F_XATTRS, F_CRC, F_DATA_NAME, F_REF, F_IMPLIED, N_FIELDS
};
_Static_assert(sizeof(FIELD_NAMES) / sizeof(FIELD_NAMES[0]) == N_FIELDS, "one name per field");

static PyTypeObject *member_type;     /* strong reference, set by bind() */
static PyObject *descriptors[N_FIELDS]; /* strong references */
static PyObject *empty_tuple;

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

/* Set slot `field` of obj to value (a new reference, consumed; NULL: an allocation failed). */
static int
set_field(PyObject *obj, int field, PyObject *value)
{
    PyObject *descr = descriptors[field];
    int rc;

    if (value == NULL)
        return -1;
    rc = Py_TYPE(descr)->tp_descr_set(descr, obj, value);
    Py_DECREF(value);
    return rc;
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
    if (member_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "member(): bind() the Member type first");
        return NULL;
    }
    size = PyLong_AsUnsignedLongLong(size_obj);
    if (size == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;

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

    obj = PyBaseObject_Type.tp_new(member_type, empty_tuple, NULL);
    if (obj != NULL
        && (set_field(obj, F_PATH, Py_NewRef(path)) < 0
            || set_field(obj, F_TYPEFLAG, PyUnicode_FromStringAndSize(&p.typeflag, 1)) < 0
            || set_field(obj, F_MODE, PyLong_FromUnsignedLongLong(p.mode & 07777)) < 0
            || set_field(obj, F_UID, PyLong_FromUnsignedLongLong(p.uid)) < 0
            || set_field(obj, F_GID, PyLong_FromUnsignedLongLong(p.gid)) < 0
            || set_field(obj, F_SIZE, Py_NewRef(size_obj)) < 0
            || set_field(obj, F_MTIME, PyLong_FromLongLong((long long)p.mtime * NS_PER_S)) < 0
            || set_field(obj, F_LINKNAME, Py_NewRef(link)) < 0
            || set_field(obj, F_DEVMAJOR, PyLong_FromUnsignedLongLong(p.devmajor)) < 0
            || set_field(obj, F_DEVMINOR, PyLong_FromUnsignedLongLong(p.devminor)) < 0
            || set_field(obj, F_XATTRS, Py_NewRef(empty_tuple)) < 0
            || set_field(obj, F_CRC, Py_NewRef(crc)) < 0
            || set_field(obj, F_DATA_NAME, Py_NewRef(name)) < 0
            || set_field(obj, F_REF, Py_NewRef(ref)) < 0
            || set_field(obj, F_IMPLIED, Py_NewRef(Py_False)) < 0))
        Py_CLEAR(obj);
    Py_DECREF(path);
    Py_DECREF(link);
    return obj;
}

PyDoc_STRVAR(bind_doc,
"bind(cls, /) -> None\n\n"
"Build members as instances of `cls`: a slots dataclass with exactly tree.Member's fields.");

static PyObject *
bind(PyObject *module, PyObject *cls)
{
    PyObject *found[N_FIELDS] = {NULL};
    PyObject *slots;
    int ok;

    (void)module;
    if (!PyType_Check(cls) || ((PyTypeObject *)cls)->tp_new != PyBaseObject_Type.tp_new
        || PyObject_HasAttrString(cls, "__post_init__")) {
        PyErr_SetString(PyExc_TypeError, "bind() wants a class without __new__ or __post_init__");
        return NULL;
    }
    /* exactly these slots, in this order */
    slots = PyObject_GetAttrString(cls, "__slots__");
    if (slots == NULL)
        PyErr_Clear();
    ok = slots != NULL && PyTuple_Check(slots) && PyTuple_GET_SIZE(slots) == N_FIELDS;
    for (int i = 0; ok && i < N_FIELDS; i++) {
        PyObject *slot = PyTuple_GET_ITEM(slots, i);
        ok = PyUnicode_Check(slot) && PyUnicode_CompareWithASCIIString(slot, FIELD_NAMES[i]) == 0;
    }
    Py_XDECREF(slots);
    if (!ok) {
        PyErr_SetString(PyExc_TypeError, "bind(): the class's __slots__ are not Member's fields");
        return NULL;
    }
    for (int i = 0; i < N_FIELDS; i++) {
        PyObject *descr = PyDict_GetItemString(((PyTypeObject *)cls)->tp_dict, FIELD_NAMES[i]);
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)
            || PyDescr_TYPE(descr) != (PyTypeObject *)cls) {
            for (int j = 0; j < i; j++)
                Py_DECREF(found[j]);
            PyErr_Format(PyExc_TypeError, "bind(): %s is not a slot of the class", FIELD_NAMES[i]);
            return NULL;
        }
        found[i] = Py_NewRef(descr);
    }
    for (int i = 0; i < N_FIELDS; i++)
        Py_XSETREF(descriptors[i], found[i]);
    Py_INCREF(cls);
    Py_XSETREF(member_type, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"member", (PyCFunction)(void (*)(void))member, METH_FASTCALL, member_doc},
    {"bind", bind, METH_O, bind_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "imgfs.layer._fastparse",
    "Compiled fast path of LayerTree._parse for plain tar header blocks.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastparse(void)
{
    empty_tuple = PyTuple_New(0);
    if (empty_tuple == NULL)
        return NULL;
    return PyModule_Create(&module_def);
}
