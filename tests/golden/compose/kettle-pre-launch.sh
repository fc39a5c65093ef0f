# kettle: verify the pinned manifest and app before any container starts
kettle_verify() (
    set -u
    dir=/dstack/kettle
    manifest_url=https://gist.githubusercontent.com/raykyri/0123/raw/manifest.json
    manifest_sha256=a7568140354615f370060b5ebe12583a6caba6ba0d91f9a2fe565231f3852e04
    app_url=https://gist.githubusercontent.com/raykyri/0123456789abcdef/raw/app.ts
    app_sha256=fc00d19bc94e10c24f07bd9be1c2bb24d4978856963c5a68745338ecbf131dfc
    app_file=app.ts
    local_manifest='{"app":"file:///kettle/app.ts","sha256":"fc00d19bc94e10c24f07bd9be1c2bb24d4978856963c5a68745338ecbf131dfc"}'
    fetch() {
        curl --fail --silent --show-error --location --proto '=https,http' --max-time 120 --output "$2" "$1"
    }
    check() {
        actual=$(sha256sum < "$2" | cut -d ' ' -f 1)
        if [ "$actual" != "$1" ]; then
            echo "kettle: $3 has sha256 $actual, expected $1" >&2
            return 1
        fi
    }
    staging="$dir.new"
    rm -rf "$staging" && mkdir -p "$staging" || return 1
    fetch "$manifest_url" "$staging/manifest.json" || return 1
    check "$manifest_sha256" "$staging/manifest.json" "manifest $manifest_url" || return 1
    fetch "$app_url" "$staging/$app_file" || return 1
    check "$app_sha256" "$staging/$app_file" "app $app_url" || return 1
    printf '%s' "$local_manifest" > "$staging/manifest.local.json" || return 1
    rm -rf "$dir" && mv "$staging" "$dir"
)
if ! kettle_verify; then
    echo "kettle: manifest or app failed verification; not starting containers" >&2
    exit 1
fi