// Package testbed pins the upstream Kubernetes control plane the project's tests run against.
//
// It has no code of its own: go.mod's tool directives name the upstream main packages
// (kube-apiserver, kubectl and etcd) and their versions, go.sum pins their bytes, and
// `cargo xtask testbed build` builds them from the Go module proxy. See docs/testbed.md.
package testbed
