from django.urls import path

from tests.django import views

urlpatterns = [
    path("nodb/", views.nodb),
    path("write/", views.write),
    path("write-fail/", views.write_fail),
    path("duplicate/", views.duplicate),
    path("down/", views.down),
    path("pooled/", views.pooled),
    path("persistent/", views.persistent),
    path("async/nodb/", views.async_nodb),
    path("async/write/", views.async_write),
    path("async/down/", views.async_down),
    path("sa/write/", views.sa_write),
]
