/*
 * A fault-injection PKCS#11 module for the reliability tests: it forwards every call
 * to a real module (SoftHSM2) and, as a control file says, can
 *   - add token flags (CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED, ...) to C_GetTokenInfo,
 *   - make C_Sign hang until the control file changes,
 *   - count C_Login and C_Sign calls into a stats file: the sums over every process using it
 *     (a new file starts at zero).
 *   - add a delay to token calls, as a network HSM's round trip does (see "delay mode" below).
 * Environment: TPP_SHIM_TARGET (real module), TPP_SHIM_CONTROL (control file),
 * TPP_SHIM_STATS (stats file). Control file lines: "flags=0x60000", "hang_sign=1".
 * Module quirks (see "module quirks" below): TPP_SHIM_HIDE_MECHANISMS, TPP_SHIM_INIT_ARGS.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/file.h>
#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST real;
static CK_FUNCTION_LIST shim;
static int loaded;

static unsigned long control_value(const char *key)
{
    const char *path = getenv("TPP_SHIM_CONTROL");
    char line[128];
    unsigned long value = 0;
    size_t len = strlen(key);
    FILE *f;

    if (path == NULL || (f = fopen(path, "r")) == NULL)
        return 0;
    while (fgets(line, sizeof line, f) != NULL)
        if (strncmp(line, key, len) == 0 && line[len] == '=')
            value = strtoul(line + len + 1, NULL, 0);
    fclose(f);
    return value;
}

/* Counters live in the stats file, updated under flock: a forking daemon's processes add up. */
static void count(int is_login)
{
    const char *path = getenv("TPP_SHIM_STATS");
    unsigned long logins = 0, signs = 0;
    FILE *f;
    int fd;

    if (path == NULL || (fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) < 0)
        return;
    if (flock(fd, LOCK_EX) != 0 || (f = fdopen(fd, "r+")) == NULL) {
        close(fd);
        return;
    }
    if (fscanf(f, "logins=%lu signs=%lu", &logins, &signs) != 2)
        logins = signs = 0;
    if (is_login)
        logins++;
    else
        signs++;
    rewind(f);
    fprintf(f, "logins=%lu\nsigns=%lu\n", logins, signs);
    fclose(f); /* releases the lock */
}

/* ---- module quirks (pkcs11 engineer) --------------------------------------------------------
 * TPP_SHIM_HIDE_MECHANISMS=0x40,0x43: the module lacks these mechanisms (here CKM_SHA256_RSA_PKCS
 * and CKM_SHA256_RSA_PKCS_PSS): left out of C_GetMechanismList, CKR_MECHANISM_INVALID from
 * C_GetMechanismInfo and C_SignInit. TPP_SHIM_INIT_ARGS=TEXT: C_Initialize answers
 * CKR_ARGUMENTS_BAD unless CK_C_INITIALIZE_ARGS.pReserved is that NUL-terminated string.
 * Read once, when the module is loaded; the wrappers go on to what the list held before them. */
static CK_MECHANISM_TYPE hidden[16];
static size_t hidden_count;
static const char *wanted_init_args;
static CK_FUNCTION_LIST quirked;

static int is_hidden(CK_MECHANISM_TYPE type)
{
    for (size_t i = 0; i < hidden_count; i++)
        if (hidden[i] == type)
            return 1;
    return 0;
}

static CK_RV quirk_GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count)
{
    CK_ULONG all = 0, kept = 0;
    CK_MECHANISM_TYPE *every;
    CK_RV rv = quirked.C_GetMechanismList(slot, NULL, &all);

    if (rv != CKR_OK)
        return rv;
    if ((every = calloc(all ? all : 1, sizeof *every)) == NULL)
        return CKR_HOST_MEMORY;
    rv = quirked.C_GetMechanismList(slot, every, &all);
    if (rv == CKR_OK) {
        for (CK_ULONG i = 0; i < all; i++)
            if (!is_hidden(every[i])) {
                if (list != NULL && kept < *count)
                    list[kept] = every[i];
                kept++;
            }
        if (list != NULL && kept > *count)
            rv = CKR_BUFFER_TOO_SMALL;
        *count = kept;
    }
    free(every);
    return rv;
}

static CK_RV quirk_GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info)
{
    return is_hidden(type) ? CKR_MECHANISM_INVALID : quirked.C_GetMechanismInfo(slot, type, info);
}

static CK_RV quirk_SignInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key)
{
    if (mechanism != NULL && is_hidden(mechanism->mechanism))
        return CKR_MECHANISM_INVALID;
    return quirked.C_SignInit(session, mechanism, key);
}

static CK_RV quirk_Initialize(CK_VOID_PTR args)
{
    CK_C_INITIALIZE_ARGS *given = args, forwarded;
    if (given == NULL || given->pReserved == NULL || strcmp(given->pReserved, wanted_init_args) != 0)
        return CKR_ARGUMENTS_BAD;
    /* The string is this module's: the one behind it wants pReserved NULL, as the standard says. */
    forwarded = *given;
    forwarded.pReserved = NULL;
    return quirked.C_Initialize(&forwarded);
}

static void quirks_install(CK_FUNCTION_LIST *list)
{
    const char *text = getenv("TPP_SHIM_HIDE_MECHANISMS");
    char *end;

    quirked = *list;
    while (text != NULL && *text != '\0' && hidden_count < sizeof hidden / sizeof hidden[0]) {
        hidden[hidden_count++] = strtoul(text, &end, 0);
        text = *end == ',' ? end + 1 : NULL;
    }
    if (hidden_count) {
        list->C_GetMechanismList = quirk_GetMechanismList;
        list->C_GetMechanismInfo = quirk_GetMechanismInfo;
        list->C_SignInit = quirk_SignInit;
    }
    if ((wanted_init_args = getenv("TPP_SHIM_INIT_ARGS")) != NULL)
        list->C_Initialize = quirk_Initialize;
}
/* ---- end of module quirks ------------------------------------------------------------------- */

static CK_RV shim_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
    CK_RV rv = real.C_GetTokenInfo(slot, info);
    if (rv == CKR_OK)
        info->flags |= control_value("flags");
    return rv;
}

static CK_RV shim_Login(CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
    count(1);
    return real.C_Login(session, user, pin, len);
}

static CK_RV shim_Sign(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG len, CK_BYTE_PTR sig,
                       CK_ULONG_PTR sig_len)
{
    while (control_value("hang_sign"))
        usleep(20000);
    if (sig != NULL)
        count(0);
    return real.C_Sign(session, data, len, sig, sig_len);
}

/* ---- delay mode (network HSM) --------------------------------------------------------------
 * TPP_SHIM_DELAY_US=N: every C_Sign that produces a signature (not the length query) takes N µs
 * more, spent before the call goes on to the real module. TPP_SHIM_DELAY_OTHER_US=M: the other
 * calls a network HSM answers over the wire each take M µs more (C_SignInit, C_OpenSession,
 * C_CloseSession, C_Login, C_FindObjectsInit, C_FindObjects, C_FindObjectsFinal,
 * C_GetAttributeValue). Read once, when the module is loaded. Without TPP_SHIM_DELAY_US, a line
 * "delay_us=N" in the control file sets C_Sign's delay, read at each call (a test changes it while
 * a daemon runs: a network HSM that slows down, then recovers). The delay is a sleep that holds
 * no lock (the shim has none; the real module is not entered yet), so calls on different
 * sessions wait side by side, as requests to a network HSM do. The wrappers call what was in
 * the function list before them, so they compose with the other modes. */
static unsigned long delay_sign_us, delay_other_us;
static int delay_from_control; /* no TPP_SHIM_DELAY_US: C_Sign's delay is the control file's */
static CK_FUNCTION_LIST delayed; /* the functions the delay wrappers go on to */

static void delay(unsigned long us)
{
    struct timespec left = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
    while (us && nanosleep(&left, &left) != 0)
        ; /* interrupted by a signal: sleep what is left */
}

static unsigned long env_us(const char *name)
{
    const char *text = getenv(name);
    return text ? strtoul(text, NULL, 10) : 0;
}

static CK_RV delay_Sign(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG len, CK_BYTE_PTR sig,
                        CK_ULONG_PTR sig_len)
{
    if (sig != NULL)
        delay(delay_from_control ? control_value("delay_us") : delay_sign_us);
    return delayed.C_Sign(session, data, len, sig, sig_len);
}

static CK_RV delay_SignInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key)
{
    delay(delay_other_us);
    return delayed.C_SignInit(session, mechanism, key);
}

static CK_RV delay_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
                               CK_SESSION_HANDLE_PTR session)
{
    delay(delay_other_us);
    return delayed.C_OpenSession(slot, flags, app, notify, session);
}

static CK_RV delay_CloseSession(CK_SESSION_HANDLE session)
{
    delay(delay_other_us);
    return delayed.C_CloseSession(session);
}

static CK_RV delay_Login(CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
    delay(delay_other_us);
    return delayed.C_Login(session, user, pin, len);
}

static CK_RV delay_FindObjectsInit(CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR templ, CK_ULONG count)
{
    delay(delay_other_us);
    return delayed.C_FindObjectsInit(session, templ, count);
}

static CK_RV delay_FindObjects(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE_PTR objects, CK_ULONG max,
                               CK_ULONG_PTR count)
{
    delay(delay_other_us);
    return delayed.C_FindObjects(session, objects, max, count);
}

static CK_RV delay_FindObjectsFinal(CK_SESSION_HANDLE session)
{
    delay(delay_other_us);
    return delayed.C_FindObjectsFinal(session);
}

static CK_RV delay_GetAttributeValue(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_PTR templ,
                                     CK_ULONG count)
{
    delay(delay_other_us);
    return delayed.C_GetAttributeValue(session, object, templ, count);
}

/* Puts the delay wrappers in front of what ``list`` holds, when the environment asks for a delay. */
static void delay_install(CK_FUNCTION_LIST *list)
{
    delay_sign_us = env_us("TPP_SHIM_DELAY_US");
    delay_other_us = env_us("TPP_SHIM_DELAY_OTHER_US");
    delay_from_control = getenv("TPP_SHIM_DELAY_US") == NULL && getenv("TPP_SHIM_CONTROL") != NULL;
    delayed = *list;
    if (delay_sign_us || delay_from_control)
        list->C_Sign = delay_Sign;
    if (delay_other_us) {
        list->C_SignInit = delay_SignInit;
        list->C_OpenSession = delay_OpenSession;
        list->C_CloseSession = delay_CloseSession;
        list->C_Login = delay_Login;
        list->C_FindObjectsInit = delay_FindObjectsInit;
        list->C_FindObjects = delay_FindObjects;
        list->C_FindObjectsFinal = delay_FindObjectsFinal;
        list->C_GetAttributeValue = delay_GetAttributeValue;
    }
}
/* ---- end of delay mode ---------------------------------------------------------------------- */

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    if (!loaded) {
        const char *target = getenv("TPP_SHIM_TARGET");
        void *handle;
        CK_RV (*get)(CK_FUNCTION_LIST_PTR_PTR);
        CK_FUNCTION_LIST_PTR target_list;

        if (target == NULL || (handle = dlopen(target, RTLD_NOW | RTLD_LOCAL)) == NULL)
            return CKR_GENERAL_ERROR;
        get = (CK_RV (*)(CK_FUNCTION_LIST_PTR_PTR))dlsym(handle, "C_GetFunctionList");
        if (get == NULL || get(&target_list) != CKR_OK)
            return CKR_GENERAL_ERROR;
        real = *target_list;
        shim = real;
        shim.C_GetFunctionList = C_GetFunctionList;
        quirks_install(&shim);
        shim.C_GetTokenInfo = shim_GetTokenInfo;
        shim.C_Login = shim_Login;
        shim.C_Sign = shim_Sign;
        delay_install(&shim);
        loaded = 1;
    }
    *list = &shim;
    return CKR_OK;
}
