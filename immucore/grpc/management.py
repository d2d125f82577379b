"""immudb's database and user management methods on an immucore node: each maps onto the
node's own management (server/node.py ``manage`` with create/update/load/unload/delete, the
UserStore of server/auth.py) behind the native handlers' permission checks
(server/handlers.py ``_sysadmin``, ``_db_admin``), with immudb's messages and texts.

A mixin of ImmuService (service.py): it uses the service's ``_call``, ``_session``, ``_db``
and ``_read``.
"""
from __future__ import annotations

import datetime as dt

import grpc

from ..errors import IllegalArgumentsError, ImmucoreError
from ..server import auth
from . import nullable_settings, schema
from .errors import StatusError
from .streaming import served




def _uncoded(check, *args):
    """A management refusal as immudb sends it: its text as a plain Go error (``fmt.Errorf``),
    so gRPC's UNKNOWN, not the INTERNAL of its ``permission denied``."""
    try:
        return check(*args)
    except auth.PermissionDeniedError as exc:
        raise ImmucoreError(str(exc)) from None


class ManagementMethods:
    # --- databases ------------------------------------------------------------------------------

    def _checked_call(self, context):
        """The call's credentials, its token or session id checked as on every call."""
        call = self._call(context)
        self._session(call)
        return call

    async def _create(self, context, name: str, settings_message, if_not_exists: bool):
        call = self._checked_call(context)
        user = _uncoded(self.checks._sysadmin, call)
        requested = nullable_settings.settings_from(settings_message)
        existed = name in self.node.settings
        s = await self._managed(self.checks._sysadmin_permit(call), self.node.create_database,
                                name, requested, user.username, if_not_exists)
        return existed, s

    async def _managed(self, permit, fn, *args):
        """A management call under the node's management lock; the caller's right is checked
        again once the lock is held (a revocation while it waited changes nothing)."""
        try:
            return await self._read(self.node.manage, fn, *args, permit=permit)
        except auth.PermissionDeniedError as exc:
            raise ImmucoreError(str(exc)) from None      # immudb's uncoded refusal

    @served
    async def CreateDatabase(self, request, context):
        await self._create(context, request.databaseName, schema.DatabaseNullableSettings(),
                           False)
        return schema.Empty()

    @served
    async def CreateDatabaseWith(self, request, context):
        await self._create(context, request.databaseName,
                           nullable_settings.legacy_settings(request), False)
        return schema.Empty()

    @served
    async def CreateDatabaseV2(self, request, context):
        existed, s = await self._create(context, request.name, request.settings,
                                        request.ifNotExists)
        return schema.CreateDatabaseResponse(name=request.name,
                                             settings=nullable_settings.settings(s),
                                             alreadyExisted=existed)

    async def _update(self, context, name: str, settings_message) -> dict:
        call = self._checked_call(context)
        user = _uncoded(self.checks._db_admin, call, name)
        requested = nullable_settings.settings_from(settings_message)
        return await self._managed(self.checks._db_admin_permit(call, name),
                                   self.node.update_database, name, requested, user.username)

    @served
    async def UpdateDatabase(self, request, context):
        await self._update(context, request.databaseName,
                           nullable_settings.legacy_settings(request))
        return schema.Empty()

    @served
    async def UpdateDatabaseV2(self, request, context):
        s = await self._update(context, request.database, request.settings)
        return schema.UpdateDatabaseResponse(database=request.database,
                                             settings=nullable_settings.settings(s))

    def _current_settings(self, context) -> tuple:
        """The settings of the call's database. immudb lets anyone who may read a database
        read its settings (the replication password is masked, as on the native protocol)."""
        db, _ = self._db(context, "read")
        return db.name, self.node.settings.get(db.name, {})

    @served
    async def GetDatabaseSettings(self, request, context):
        return nullable_settings.legacy_from(*self._current_settings(context))

    @served
    async def GetDatabaseSettingsV2(self, request, context):
        name, s = self._current_settings(context)
        return schema.DatabaseSettingsResponse(database=name,
                                               settings=nullable_settings.settings(s))

    async def _listed(self, context) -> list:
        """The databases the caller may read (all for the sysadmin), as the native list."""
        call = self._checked_call(context)
        listed = await self._read(self.node.list_databases)
        _, user = self._session(call)          # still logged in after the read, and as whom
        return [d for d in listed if user.sysadmin or user.can(d["name"], "read")]

    @served
    async def DatabaseList(self, request, context):
        out = schema.DatabaseListResponse()
        for d in await self._listed(context):
            out.databases.add(databaseName=d["name"])
        return out

    @served
    async def DatabaseListV2(self, request, context):
        out = schema.DatabaseListResponseV2()
        for d in await self._listed(context):
            s = self.node.settings.get(d["name"], {})
            out.databases.add(name=d["name"], settings=nullable_settings.settings(s),
                              loaded=d["loaded"], diskSize=d["disk_size_bytes"],
                              numTransactions=d["tx_count"] or 0,
                              created_at=_unix_seconds(d["created_at"]),
                              created_by=d["created_by"])
        return out

    async def _admin_call(self, context, name: str, fn, *args):
        call = self._checked_call(context)
        user = _uncoded(self.checks._db_admin, call, name)
        await self._managed(self.checks._db_admin_permit(call, name), fn, name,
                            *(a(user) if callable(a) else a for a in args))

    @served
    async def LoadDatabase(self, request, context):
        await self._admin_call(context, request.database, self.node.load_database)
        return schema.LoadDatabaseResponse(database=request.database)

    @served
    async def UnloadDatabase(self, request, context):
        await self._admin_call(context, request.database, self.node.unload_database)
        return schema.UnloadDatabaseResponse(database=request.database)

    @served
    async def DeleteDatabase(self, request, context):
        await self._admin_call(context, request.database, self.node.delete_database,
                               lambda user: user.username)
        return schema.DeleteDatabaseResponse(database=request.database)

    # --- users ----------------------------------------------------------------------------------

    @served
    async def CreateUser(self, request, context):
        call = self._checked_call(context)
        name = _text(request.user, "user")
        permission = auth.parse_permission(request.permission)
        if permission == auth.PERMISSION_SYSADMIN:
            creator = _uncoded(self.checks._sysadmin, call)
        else:
            creator = _uncoded(self.checks._db_admin, call, request.database)
            self.node.database(request.database)
        await self._read(self.node.users.create_user, name, request.password, permission,
                         request.database, creator)
        return schema.Empty()

    @served
    async def ListUsers(self, request, context):
        call = self._checked_call(context)
        users = await self._read(self.node.users.list_users)
        _, user = self._session(call)          # still logged in after the read, and as whom
        if not user.sysadmin:
            users = [u for u in users if u.username == user.username or any(
                user.can(db, "admin") for db in u.permissions)]
        out = schema.UserList()
        for u in users:
            listed = out.users.add(user=u.username.encode(), createdby=u.created_by,
                                   createdat=_go_time(u.created_at), active=u.active)
            for database, permission in u.permissions.items():
                listed.permissions.add(database=database, permission=permission)
        return out

    @served
    async def ChangePassword(self, request, context):
        call = self._checked_call(context)
        _, user = self._session(call)
        name = _text(request.user, "user")
        await self._read(self.node.users.change_password, name, request.oldPassword or None,
                         request.newPassword, user)
        return schema.Empty()

    @served
    async def ChangePermission(self, request, context):
        """immudb's order of checks, and its status codes: this is the one user call where
        immudb gives its refusals codes of their own."""
        call = self._checked_call(context)
        _, user = self._session(call)
        if not request.username:
            raise StatusError(code=grpc.StatusCode.INVALID_ARGUMENT,
                              text="username can not be empty")
        if not request.database:
            raise StatusError(code=grpc.StatusCode.INVALID_ARGUMENT,
                              text="database can not be empty")
        if request.database != auth.SYSTEMDB_NAME and request.database not in self.node.settings:
            raise StatusError(code=grpc.StatusCode.INVALID_ARGUMENT,
                              text="database does not exist")
        actions = schema.PermissionAction.values_by_name
        fn = {actions["GRANT"].number: self.node.users.grant,
              actions["REVOKE"].number: self.node.users.revoke}.get(request.action)
        if fn is None:
            raise StatusError(code=grpc.StatusCode.INVALID_ARGUMENT,
                              text="action not recognized")
        try:
            permission = auth.parse_permission(request.permission)
        except auth.UnknownPermissionError:
            raise StatusError(code=grpc.StatusCode.INVALID_ARGUMENT,
                              text="unrecognized permission") from None
        name = request.username
        if name == user.username:
            raise StatusError(code=grpc.StatusCode.INVALID_ARGUMENT,
                              text="changing your own permissions is not allowed")
        if name == auth.SYSADMIN_USERNAME:
            raise StatusError(code=grpc.StatusCode.INVALID_ARGUMENT,
                              text="changing sysadmin permissions is not allowed")
        if not user.can(request.database, "admin"):      # the native handler's check
            raise StatusError(code=grpc.StatusCode.PERMISSION_DENIED,
                              text="you do not have permission on this database")
        try:
            await self._read(fn, name, permission, request.database, by_user=user)
        except auth.UserNotFoundError:
            raise StatusError(code=grpc.StatusCode.NOT_FOUND,
                              text=f"user {name} not found") from None
        except auth.UserNotActiveError:
            raise StatusError(code=grpc.StatusCode.FAILED_PRECONDITION,
                              text=f"user {name} is not active") from None
        return schema.Empty()

    @served
    async def SetActiveUser(self, request, context):
        call = self._checked_call(context)
        _, user = self._session(call)
        await self._read(self.node.users.set_active, request.username, request.active,
                         by_user=user)
        return schema.Empty()


def _text(value: bytes, field: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise IllegalArgumentsError(f"{field} must be UTF-8 text") from None


def _go_time(seconds: float) -> str:
    """A moment as immudb lists it (Go's ``time.Time.String()``, in UTC)."""
    moment = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f +0000 UTC")


def _unix_seconds(iso: str) -> int:
    """A database's creation moment (ISO 8601, as stored) in Unix seconds, 0 if unknown."""
    try:
        return int(dt.datetime.fromisoformat(iso).timestamp()) if iso else 0
    except ValueError:
        return 0

