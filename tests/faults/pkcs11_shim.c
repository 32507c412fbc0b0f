/*
 * A fault-injection PKCS#11 module for the reliability tests: it forwards every call
 * to a real module (SoftHSM2) and, as a control file says, can
 *   - add token flags (CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED, ...) to C_GetTokenInfo,
 *   - make C_Sign hang until the control file changes,
 *   - count C_Login and C_Sign calls into a stats file: the sums over every process using it
 *     (a new file starts at zero).
 * Environment: TPP_SHIM_TARGET (real module), TPP_SHIM_CONTROL (control file),
 * TPP_SHIM_STATS (stats file). Control file lines: "flags=0x60000", "hang_sign=1".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
        shim.C_GetTokenInfo = shim_GetTokenInfo;
        shim.C_Login = shim_Login;
        shim.C_Sign = shim_Sign;
        loaded = 1;
    }
    *list = &shim;
    return CKR_OK;
}
