#!/usr/bin/env bash
# Builds a PostgreSQL image from this machine's own PostgreSQL files (no
# registry is reachable here): the server's binaries and share directory,
# the libraries ldd names, a shell, and an entrypoint that honours
# POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB as the official image
# does. Usage: postgres-image.sh IMAGE_NAME
set -euo pipefail
name=${1:?image name}
bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
ver=$(basename "$(dirname "$bindir")")
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,tmp,etc,var/lib/postgresql,var/run/postgresql} "$root$bindir"
chmod 1777 "$root/tmp" "$root/var/run/postgresql"
for b in postgres initdb pg_ctl; do cp "$bindir/$b" "$root$bindir/"; done
# The server's own modules (plpgsql, the snowball dictionaries initdb loads).
libdir=/usr/lib/postgresql/$ver/lib
mkdir -p "$root$libdir"
cp -r "$libdir"/. "$root$libdir/"
mkdir -p "$root/usr/share/postgresql"
cp -r "/usr/share/postgresql/$ver" "$root/usr/share/postgresql/"
cp -rL /usr/share/postgresql-common "$root/usr/share/" 2>/dev/null || true
cp /bin/sh "$root/bin/sh"
for b in cat mkdir chmod chown id; do cp "$(command -v $b)" "$root/bin/"; done
# Every shared library the binaries need, at the same path.
for f in "$root$bindir"/* "$root"/bin/* "$root$libdir"/*.so; do
	ldd "$f" 2>/dev/null | awk '/=>/ {print $3} /^\t\/.*ld-linux/ {print $1}'
done | sort -u | while read -r lib; do
	[ -f "$lib" ] || continue
	mkdir -p "$root$(dirname "$lib")"
	cp -L "$lib" "$root$lib"
done
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
echo "postgres:x:999:999:postgres:/var/lib/postgresql:/bin/sh" >>"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
echo "postgres:x:999:" >>"$root/etc/group"
cat >"$root/entrypoint.sh" <<SH
#!/bin/sh
set -e
: "\${POSTGRES_USER:=postgres}"
: "\${POSTGRES_DB:=\$POSTGRES_USER}"
PGDATA=/var/lib/postgresql/data
if [ ! -s "\$PGDATA/PG_VERSION" ]; then
	echo "\${POSTGRES_PASSWORD:-postgres}" >/tmp/pwfile
	$bindir/initdb -D "\$PGDATA" -U "\$POSTGRES_USER" --pwfile=/tmp/pwfile -A scram-sha-256 -E UTF8 --locale=C >/dev/null
	echo "host all all all scram-sha-256" >>"\$PGDATA/pg_hba.conf"
	if [ "\$POSTGRES_DB" != postgres ]; then
		echo "CREATE DATABASE \"\$POSTGRES_DB\"" | $bindir/postgres --single -D "\$PGDATA" postgres >/dev/null
	fi
fi
exec $bindir/postgres -D "\$PGDATA" -c listen_addresses='*' -c fsync=off "\$@"
SH
chmod 755 "$root/entrypoint.sh"
chown -R 999:999 "$root/var/lib/postgresql" "$root/var/run/postgresql"
tar -C "$root" -c . | docker import \
	--change 'USER postgres' --change 'ENTRYPOINT ["/entrypoint.sh"]' --change 'EXPOSE 5432' \
	--change 'ENV LANG=C' - "$name" >/dev/null
echo "$name"
