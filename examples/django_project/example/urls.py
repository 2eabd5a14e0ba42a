from django.urls import path

from catalog import views

urlpatterns = [
    path("", views.index),
    path("items", views.items),
    path("items/create", views.create),
    path("items/fail", views.fail),
]
